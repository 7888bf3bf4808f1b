"""BTCV label map: index -> organ name (index 0 is background)."""

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
