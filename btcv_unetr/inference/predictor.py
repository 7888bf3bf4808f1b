"""The predictor: model(s) loaded once; preprocess -> sliding window (+ flip TTA) -> softmax (averaged over an
ensemble's members, each with its own network and window) -> the scan's own grid."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import KeepLargestConnectedComponent
from torch import nn

from ..config.schema import Config
from ..data.images import check_picture_size, is_picture
from ..data.transforms import NonFiniteVoxels, infer_transforms
from ..distributed import pick_device
from ..errors import UserError, one_line
from ..io.card import model_card_lines
from ..model.architectures import describe_network
from ..model.build import describe_model_size
from ..model.speed import compile_if_asked, network_bf16_speedup, prepare_model
from ..runtime.precision import cpu_features, resolve_precision
from .ensemble import ensemble_card, ensemble_checksum
from .inversion import probabilities_to_picture, probabilities_to_scan
from .loader import load_members
from .provenance import provenance as mask_provenance
from .sliding_window import (
    LARGE_SCAN_WINDOWS,
    auto_sw_batch_size,
    window_bound_problem,
    window_settings,
    windows_per_pass,
)


class Predictor:
    """Loads the model (or an ensemble's models: ``--checkpoints``) once and segments any number of scans."""

    def __init__(self, config: Config):
        self.device = pick_device(config.infer.device)
        self.weights_files, members = load_members(config, self.device)
        # The first member's config (preprocessing, classes, precision, inference settings) serves all: the others
        # share its preprocessing (load_members checked), so one preprocessed image feeds them all. Each member keeps
        # its own network and window (member_models): a Swin UNETR of ROI 64 beside a SegResNet of 32.
        self.config = members[0].config
        self.member_models = [member.config.model for member in members]
        self.network = describe_network(self.member_models)  # "SegResNet", "ensemble of 2: UNETR, SegResNet"
        self.member_checksums = [member.weights_checksum for member in members]
        self.weights_checksum = ensemble_checksum(self.member_checksums)
        self.model_card = ensemble_card(self.weights_files, [member.card for member in members], self.member_checksums,
                                        self.member_models)
        print("\n".join(model_card_lines(self.model_card)))
        requested = self.config.train.precision
        stored = requested != config.train.precision
        self.precision = resolve_precision(requested, self.device, self.config.model,
                                           "the training run's setting, from its checkpoint" if stored else "",
                                           network_probe=network_bf16_speedup)
        print(self.precision.describe())
        for model in {repr(model): model for model in self.member_models}.values():  # each distinct network once
            print(describe_model_size(model, self.config.data.pixdim))
        self.models: list[nn.Module] = []
        self.memory_formats: list[torch.memory_format] = []
        for member in members:
            prepared, memory_format = prepare_model(member.model, config.fast, self.device, self.precision.name,
                                                    training=False)
            self.models.append(compile_if_asked(prepared, config.fast))
            self.memory_formats.append(memory_format)
        self.memory_format = self.memory_formats[0]
        self.transform = infer_transforms(self.config)
        # Windows per forward pass, per member (its own window size); sw_batch_size is the first member's.
        self.sw_batch_sizes = [auto_sw_batch_size(config.infer.sw_batch_size, self.device, model.roi_size,
                                                  model.feature_size, self.precision.name)
                               for model in self.member_models]
        self.sw_batch_size = self.sw_batch_sizes[0]
        # Called with the number of windows each forward pass has run (the service's job progress).
        self.on_windows: Callable[[int], None] | None = None

    def flips(self) -> int:
        """Sliding-window passes of each member over a scan: 1, or with TTA 1 + one flip per spatial axis."""
        return 1 + (self.config.model.spatial_dims if self.config.infer.tta else 0)

    def passes(self) -> int:
        """Sliding-window passes over each scan: its test-time flips times the ensemble's members."""
        return self.flips() * len(self.models)

    def window_count(self, image: torch.Tensor) -> int:
        """Windows (all test-time flips and ensemble members, each with its own window size, included) the networks
        run on a preprocessed ``(1, *spatial)`` image (:func:`windows_per_pass`, checked against MONAI by
        tests/test_monai_internals.py)."""
        overlap = self.config.infer.infer_overlap
        windows = sum(windows_per_pass(image.shape[1:], model.roi_size, overlap) for model in self.member_models)
        return windows * Predictor.flips(self)

    def check_windows(self, image: torch.Tensor, path: Path) -> None:
        """A one-line error naming ``path`` when ``--infer_overlap`` plans more windows over the preprocessed
        ``image`` than ``--max_windows_factor`` times those of overlap 0.5 (a 0.99 overlap is a 1-voxel stride:
        hours per scan), for any member's window size, before any window runs."""
        infer = self.config.infer
        for roi in dict.fromkeys(model.roi_size for model in self.member_models):
            problem = window_bound_problem(image.shape[1:], roi, infer.infer_overlap, infer.max_windows_factor,
                                           self.passes())
            if problem:
                raise UserError(f"{path}: {problem}")

    def _stitch_device(self, image: torch.Tensor) -> torch.device:
        """Blend windows on the GPU when the class map and its weights fit in a quarter of free memory, else the CPU."""
        if self.device.type != "cuda":
            return torch.device("cpu")
        needed = 2 * 4 * self.config.model.out_channels * image.numel()
        return self.device if needed < torch.cuda.mem_get_info(self.device)[0] // 4 else torch.device("cpu")

    def _window(self, model: nn.Module, memory_format: torch.memory_format, window: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(self.device):
            logits = model(window.contiguous(memory_format=memory_format))
        if self.on_windows is not None:
            self.on_windows(window.shape[0])
        # The blending buffers are float32 in the default layout: convert both in one pass, not in a
        # strided accumulation per window.
        return logits.to(torch.float32, memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax ``(C, X, Y, Z)`` on CPU for a preprocessed ``(1, X, Y, Z)`` image: an ensemble's is the mean of its
        members' (each with its own network, window size and TTA flips).

        The mean is taken here, on the preprocessed grid, and the argmax once, on the scan's grid
        (:meth:`to_scan`): the way back to the scan is an interpolation whose weights sum to 1, with fixed
        background outside the crop, so the mean here is the mean of the members' probabilities in the scan's own
        geometry.
        """
        total = self._model_probabilities(0, image)
        for index in range(1, len(self.models)):  # in place: one scan-sized buffer more than a single model needs
            total += self._model_probabilities(index, image)
        return total.div_(len(self.models))

    def _model_probabilities(self, index: int, image: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s softmax ``(C, X, Y, Z)`` on CPU, with its own window size; TTA averages 3 flips too.

        Windows run on the model's device; they are blended there too when the scan fits, else on the CPU.
        """
        infer, roi = self.config.infer, self.member_models[index].roi_size
        dims = self.config.model.spatial_dims
        flips = [()] + ([(axis,) for axis in range(2, 2 + dims)] if infer.tta else [])
        # A bar over the windows when asked, or when a scan holds many windows' worth of voxels.
        progress = infer.sw_progress or image.numel() > LARGE_SCAN_WINDOWS * math.prod(roi)
        total, stitch = None, self._stitch_device(image)
        window = functools.partial(self._window, self.models[index], self.memory_formats[index])
        for dims in flips:
            x = image[None].as_tensor() if isinstance(image, MetaTensor) else image[None]
            x = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(x, sw_batch_size=self.sw_batch_sizes[index], predictor=window,
                                              sw_device=self.device, device=stitch, progress=progress,
                                              **{**window_settings(self.config), "roi_size": roi})
            probs = torch.softmax(logits, dim=1).cpu()
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        return (total / len(flips))[0]

    def prepare(self, path: Path) -> MetaTensor:
        """The preprocessed image ``(1, x, y, z)`` of the scan at ``path``, or a one-line error naming it: a picture
        over ``--max_pixels`` (from its header, before it is decoded), an unreadable file, NaN or infinite voxels
        (counted as read, before the intensity window)."""
        if is_picture(path):
            check_picture_size(path, self.config.data.max_pixels)
        try:
            image = self.transform({"image": str(path)})["image"]
        except Exception as exc:  # MONAI wraps the reader's error (truncated gzip, bad header ...)
            non_finite = _wrapped(exc, NonFiniteVoxels)
            if non_finite is not None:
                raise UserError(f"{path}: the image has {non_finite}, and run again (btcv-unetr check-data counts "
                                "them in a datalist)") from None
            cause = exc.__cause__ or exc
            detail = (str(cause).strip().splitlines() or [""])[0]
            raise UserError(f"{path}: cannot be read ({cause.__class__.__name__}: {detail})") from None
        return image

    def to_scan(self, probs: torch.Tensor, image: MetaTensor,
                keep_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and probabilities) on the scan's grid from ``probs`` on the preprocessed grid of ``image``."""
        if self.config.model.spatial_dims == 2:
            return probabilities_to_picture(probs, image, keep_probabilities)
        return probabilities_to_scan(probs, image, keep_probabilities=keep_probabilities)

    def segment(self, path: Path, keep_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Native-geometry labels (uint8) and, on request, float16 probabilities ``(C, X, Y, Z)``; the number of
        windows is printed before they run, and a scan over ``--max_windows_factor`` refused (the command line's
        bound; the service shows each job's windows and ends it at its time limit)."""
        image = self.prepare(path)
        self.check_windows(image, path)
        windows = self.window_count(image)
        passes = f", {self.passes()} passes" if self.passes() > 1 else ""
        print(one_line(f"{Path(path).name}: {windows:,} sliding window{'s' if windows != 1 else ''} (overlap "
                       f"{self.config.infer.infer_overlap:g}{passes})"))
        return self.to_scan(self.probabilities(image), image, keep_probabilities)

    def provenance(self) -> dict:
        """What this predictor's masks are made with (package version, weights checksum, precision, device,
        overlap, TTA): stored in every mask's header, so that a mask can be traced and made again."""
        infer = self.config.infer
        name = cpu_features().model if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)
        made_with = mask_provenance(self.weights_checksum, self.precision.name, str(self.device), infer.infer_overlap,
                                    infer.tta, infer.mode, self.model_card, name, self.member_models)
        if len(self.models) > 1:  # weights_sha256 is then the ensemble's (ensemble.ensemble_checksum)
            made_with["ensemble_weights_sha256"] = list(self.member_checksums)
        return made_with


def _wrapped(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The error of type ``kind`` in ``exc``'s chain of causes (MONAI wraps a transform's error in a RuntimeError,
    once per Compose), or None."""
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__
    return exc


def keep_largest_components(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """MONAI's largest-connected-component filter, per organ (needs scikit-image)."""
    try:
        import skimage  # noqa: F401  (MONAI uses it for connected components on CPU)
    except ImportError:
        raise UserError("--largest_component needs scikit-image: pip install 'btcv-unetr[post]'") from None
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)), independent=True)
    return np.asarray(keep(torch.from_numpy(labels)[None])[0]).astype(np.uint8)
