"""What a mask was made with: the provenance its header carries (``btcv_unetr.data.images.write_mask`` stores it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import __version__


def provenance(weights_sha256: str, precision: str, device: str, overlap: float, tta: bool, mode: str,
               card: Mapping[str, Any] | None, device_name: str = "") -> dict[str, Any]:
    """What a mask was made with, as plain values: enough to make the same mask bytes again."""
    return {"package_version": __version__, "weights_sha256": weights_sha256, "precision": precision,
            "device": device, "device_name": device_name, "overlap": float(overlap), "tta": bool(tta), "mode": mode,
            "synthetic_training_data": bool(card.get("synthetic")) if card else None}
