"""Older config files and checkpoints keep loading: keys renamed, removed or moved since they were written."""

from __future__ import annotations

from typing import Any

# Keys renamed since they were first written to config files and checkpoints: (section, old key) ->
# (new key, old value -> new value). Files that use the old key keep loading.
RENAMED_KEYS: dict[tuple[str, str], tuple[str, Any]] = {
    ("train", "amp"): ("precision", lambda amp: "auto" if amp else "fp32"),
}


# Keys removed since: dropped silently from files and checkpoints that still carry them.
REMOVED_KEYS: set[tuple[str, str]] = {
    ("infer", "fast_invert"),  # the one-pass inversion became the only inversion path
}

# Keys moved to another section since: (old section, key) -> new section (a value given there too wins).
MOVED_KEYS: dict[tuple[str, str], str] = {
    ("fast", "crop_before_resampling"): "data",  # it changes the voxel grid: preprocessing, not a speed switch
    ("infer", "overwrite"): "general",  # it also governs training run folders and export
}


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (nested sections) with renamed keys under their new names, moved keys in their new sections (a
    new key given too wins) and removed keys dropped."""
    migrated: dict[str, Any] = {}
    moved: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if isinstance(values, dict):
            values = {key: value for key, value in values.items() if (section, key) not in REMOVED_KEYS}
            for (renamed_section, old), (new, convert) in RENAMED_KEYS.items():
                if renamed_section == section and old in values:
                    value = values.pop(old)
                    values.setdefault(new, convert(value))
            for (old_section, key), new_section in MOVED_KEYS.items():
                if old_section == section and key in values:
                    moved.setdefault(new_section, {})[key] = values.pop(key)
        migrated[section] = values
    for section, values in moved.items():
        target = migrated.setdefault(section, {})
        if isinstance(target, dict):
            for key, value in values.items():
                target.setdefault(key, value)
    return migrated


