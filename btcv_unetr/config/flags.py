"""Command-line flags: one per config field a command takes (reference names), and their values as a Config.

Each command declares the fields it takes (:data:`CommandFlags`, beside the command: ``train/command.py``
``TRAIN_FLAGS`` ...); a YAML file may set any key, but a flag a command would ignore is refused, naming the
commands that take it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from ..errors import one_line
from .load import CONFIG_DIR, PRESETS, build_config, read_yaml
from .schema import FIELD_SECTION, SECTIONS, Config, field_types, flag_type

# The config flags of a command: section -> the names of its fields the command takes, or None for all of them.
CommandFlags = Mapping[str, "tuple[str, ...] | None"]
# Every field of every section: parse_config, for tests and simple entry points.
ALL_FLAGS: CommandFlags = {section: None for section in SECTIONS}


def command_fields(wanted: CommandFlags) -> dict[str, list[dataclasses.Field]]:
    """The config fields a command takes flags for, per section, in the order the sections declare them."""
    return {section: [f for f in dataclasses.fields(SECTIONS[section]) if names is None or f.name in names]
            for section, names in wanted.items()}


def add_config_arguments(parser: argparse.ArgumentParser, wanted: CommandFlags = ALL_FLAGS,
                         unused: Mapping[str, tuple[str, ...]] | None = None, unused_help: str = "") -> None:
    """Add ``--config``, ``--preset`` and one flag per config field of ``wanted`` (reference names; defaults in help).

    ``unused``: per section, fields accepted without being used (a reference command's flags); their help is
    ``unused_help``. Flags default to ``argparse.SUPPRESS`` so that only flags the user typed override the YAML file.
    """
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of config sections; flags given on the command line override it")
    parser.add_argument("--preset", default=None, choices=PRESETS,
                        help="model size (configs/preset_NAME.yaml): lite (CPUs), base (the paper's ViT-B), large "
                             "(ViT-L); applied after --config, before the other flags")
    for section, fields in command_fields(wanted).items():
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} ({cls.__doc__.strip()})")
        hints = field_types(cls)
        for f in fields:
            flags = f.metadata["flags"] or (f"--{f.name}",)
            accepted_only = f.name in (unused or {}).get(section, ())
            # argparse formats help with %: a literal % in a text ("30% faster") must be doubled.
            help_text = (unused_help if accepted_only else
                         f"{f.metadata['help']} (default: {f.default})").replace("%", "%%")
            base = flag_type(hints[f.name])
            if base is bool:
                group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            elif typing.get_origin(base) is list:
                group.add_argument(*flags, dest=f.name, nargs="+", type=typing.get_args(base)[0], metavar="PATH",
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(*flags, dest=f.name, type=base, choices=f.metadata["choices"],
                                   default=argparse.SUPPRESS, help=help_text)
            for alias, value in f.metadata["aliases"]:
                group.add_argument(alias, dest=f.name, action="store_const", const=value, default=argparse.SUPPRESS,
                                   help=f"sets {f.name} to {value} (reference flag)")


def _flags_of(f: dataclasses.Field, hint: Any) -> list[str]:
    """Every flag that sets field ``f``: its names, its aliases and the ``--no-`` form of a switch."""
    names = list(f.metadata["flags"] or (f"--{f.name}",)) + [alias for alias, _ in f.metadata["aliases"]]
    return names + ([f"--no-{f.name}"] if flag_type(hint) is bool else [])


def unrecognized_flags_message(command: str, words: list[str], commands: Mapping[str, CommandFlags]) -> str:
    """The error line for flags ``command`` does not take: config flags of the other ``commands`` (name -> its
    config flags) are named as such, listing the commands that take them in the order of ``commands``."""
    owners: dict[str, list[str]] = {}
    for other, wanted in commands.items():
        for section, fields in command_fields(wanted).items():
            hints = field_types(SECTIONS[section])
            for f in fields:
                for flag in _flags_of(f, hints[f.name]):
                    owners.setdefault(flag, []).append(other)
    flags = [word.split("=")[0] for word in words if word.startswith("-")]
    known = [flag for flag in flags if flag in owners]
    if known:
        return "; ".join(f"{flag} is not a flag of '{command}' (it is one of: {', '.join(owners[flag])})"
                         for flag in known)
    return f"unrecognized arguments: {' '.join(words)}"


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then ``args.config`` (if any), then the ``--preset`` file, then the flags present in ``args``."""
    layers = [read_yaml(args.config)] if getattr(args, "config", None) else []
    if getattr(args, "preset", None):
        layers.append(read_yaml(CONFIG_DIR / f"preset_{args.preset}.yaml"))
    flags: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in vars(args).items():
        if name in FIELD_SECTION:
            flags[FIELD_SECTION[name]][name] = value
    return build_config(layers + [flags])


class FlagParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse prints its whole usage, 60+ lines here, first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (--help lists the flags)\n")


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """Parse a full command line into a :class:`Config` (used by tests and simple entry points)."""
    parser = FlagParser(description=description)
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))
