"""The reference-style path: every speed switch off, and masks inverted by MONAI's inverse transforms.

Used by ``benchmarks/bench.py`` as the baseline of each ratio and by the tests as the oracle of the
one-pass inversion (``btcv_unetr.inference.inversion.probabilities_to_scan``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from ..config.schema import Config, FastConfig
from ..inference.predictor import Predictor


def reference_style(config: Config) -> Config:
    """``config`` with every speed switch off: the path the reference recipe takes.

    float32 (no autocast), MONAI's default attention, glibc's default allocator, the crops of a batch
    in one forward pass, one window per pass, the whole scan resampled before the body crop. Its
    masks come from :class:`InverseTransformPredictor`.
    """
    fast = FastConfig(malloc_tuning=False, sdpa=False, micro_batch=config.data.num_samples * config.train.batch_size,
                      fused_optimizer=False, compile=False, channels_last=False)
    return dataclasses.replace(config, fast=fast, train=dataclasses.replace(config.train, precision="fp32"),
                               data=dataclasses.replace(config.data, crop_before_resampling=False),
                               infer=dataclasses.replace(config.infer, sw_batch_size=1))


class InverseTransformPredictor(Predictor):
    """A :class:`Predictor` whose masks come from MONAI's ``Invertd``, one probability channel at a time.

    This is how a MONAI pipeline writes native-geometry masks: each channel goes back through
    crop, spacing and orientation, and the argmax is kept as a running maximum, so memory stays at
    two native-size channels.
    """

    def invert(self, values: torch.Tensor, image: MetaTensor, nearest: bool) -> np.ndarray:
        """Undo the spatial preprocessing of ``values`` ``(1, x, y, z)``; returns the native-size ``(X, Y, Z)``
        array."""
        inverter = Invertd(keys="pred", transform=self.transform, orig_keys="image", nearest_interp=nearest)
        prediction = MetaTensor(values, meta=dict(image.meta))
        return inverter({"image": image, "pred": prediction})["pred"][0].numpy()

    def to_scan(self, probs: torch.Tensor, image: MetaTensor,
                keep_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        best = labels = stored = None
        for channel in range(probs.shape[0]):
            if channel == 0:
                # Undoing the foreground crop pads with 0: invert 1 - p so that outside the body is background.
                native = 1.0 - self.invert(1.0 - probs[:1], image, nearest=False)
            else:
                native = self.invert(probs[channel:channel + 1], image, nearest=False)
            if best is None:
                best, labels = native, np.zeros(native.shape, np.uint8)
                stored = np.empty((probs.shape[0], *native.shape), np.float16) if keep_probabilities else None
            else:
                better = native > best
                labels[better] = channel
                best = np.where(better, native, best)
            if stored is not None:
                stored[channel] = native
        return labels, stored
