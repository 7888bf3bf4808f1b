"""What a mask was made with: the provenance its header carries (``btcv_unetr.data.images.write_mask`` stores it).

    provenance  the plain values: version, weights checksum, precision, device, blending, the net(s), training data
    network_of  the net a provenance names, for a DICOM object's descriptions ("UNETR" where it names none)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import __version__
from ..config.schema import ModelConfig
from ..model.architectures import describe_network, network_facts

# The net of a provenance that names none: masks made before the network was a choice (issue 28) were UNETR's.
DEFAULT_NETWORK = "UNETR"


def provenance(weights_sha256: str, precision: str, device: str, overlap: float, tta: bool, mode: str,
               card: Mapping[str, Any] | None, device_name: str = "",
               models: Sequence[ModelConfig] = ()) -> dict[str, Any]:
    """What a mask was made with, as plain values: enough to make the same mask bytes again.

    ``models``: the config of each network that made it (an ensemble's members, in order): ``network`` names them
    (:func:`~btcv_unetr.model.architectures.describe_network`: "SegResNet", "ensemble of 3: UNETR, Swin UNETR x2")
    and ``networks`` gives each one's name, own settings and window
    (:func:`~btcv_unetr.model.architectures.network_facts`); without ``models`` neither key is written.
    """
    made_with = {"package_version": __version__, "weights_sha256": weights_sha256, "precision": precision,
                 "device": device, "device_name": device_name, "overlap": float(overlap), "tta": bool(tta),
                 "mode": mode, "synthetic_training_data": bool(card.get("synthetic")) if card else None}
    if models:
        made_with["network"] = describe_network(list(models))
        made_with["networks"] = [network_facts(model) for model in models]
    return made_with


def network_of(made_with: Mapping[str, Any] | None) -> str:
    """The net ``made_with`` (a :func:`provenance`) names, or :data:`DEFAULT_NETWORK` where it names none."""
    return str((made_with or {}).get("network") or DEFAULT_NETWORK)
