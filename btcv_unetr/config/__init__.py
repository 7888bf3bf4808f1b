"""One resolved configuration: defaults, then a YAML file, then command-line flags, passed down to every stage.

    schema      the sections (dataclasses) and their fields: defaults, help, flags
    migration   keys renamed, removed or moved since older files and checkpoints were written
    validation  types, choices and ranges, one line naming the key (:class:`ConfigError`)
    load        YAML files and stored dicts layered over the defaults (``build_config``)
    flags       one flag per field a command takes (each command declares its own), parsed into a Config

Configuration flows one way: YAML -> flags -> ``flags.config_from_args`` -> one Config.
"""
