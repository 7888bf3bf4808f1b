"""BTCV label map: index -> organ name (index 0 is background), and each organ's plausible adult volume."""

BTCV_LABELS: tuple[str, ...] = (
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic veins",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
)
ORGANS: tuple[str, ...] = BTCV_LABELS[1:]


def label_map() -> dict[str, str]:
    """The Decathlon-style ``labels`` entry of a datalist: ``{"0": "background", ...}``."""
    return {str(index): name for index, name in enumerate(BTCV_LABELS)}


# Plausible adult volumes in mL, far wider than normal ranges: a flag means "far outside", i.e. a wrong
# mask, an organ cut by the scan's field of view, or disease worth a look. Where a published reference
# interval exists the range is half its lower and twice its upper limit. Sources and the reasoning per
# organ: README, *Organ volumes and their plausible range*. 0 as the lower end: no lower flag.
PLAUSIBLE_VOLUMES_ML: dict[str, tuple[float, float]] = {
    "liver": (410.0, 3400.0),
    "spleen": (40.0, 640.0),
    "pancreas": (10.0, 250.0),
    "right kidney": (50.0, 500.0),
    "left kidney": (50.0, 500.0),
    "right adrenal gland": (1.3, 13.0),
    "left adrenal gland": (1.4, 12.0),
    "gallbladder": (0.0, 150.0),
    "stomach": (0.0, 4000.0),
    # No range: how much of the esophagus, aorta, inferior vena cava and portal/splenic veins an
    # abdominal scan holds depends on where it starts and ends, not on the patient.
}


def volume_flag(name: str, ml: float) -> str | None:
    """"low" or "high" where ``ml`` is outside organ ``name``'s plausible range, else None (also for an organ
    without a range, and for no voxels at all: the scan may not reach the organ, or it was removed)."""
    bounds = PLAUSIBLE_VOLUMES_ML.get(name)
    if bounds is None or not ml > 0:
        return None
    low, high = bounds
    if ml < low:
        return "low"
    return "high" if ml > high else None
