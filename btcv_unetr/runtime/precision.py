"""Numeric precision chosen per machine: the autocast dtype of a run, and the reason for it.

    cpu_features       what this CPU computes natively (model name, torch's kernel level, bf16/AMX flags)
    resolve_precision  the setting ``auto|fp32|bf16|fp16`` -> :class:`Precision` for a device
    Precision          autocast context, gradient scaler, and the one line that explains the choice
    DecisionCache      the probe's decisions kept per machine and model shape (``precision.json`` in the user's cache)

``auto`` on a CPU takes bfloat16 only where the processor computes it natively (x86 AVX512-BF16 or
AMX, ARM BF16) *and* a probe on the model's own layer shapes finds it faster than float32: on an
AVX2-only CPU bfloat16 autocast runs 10-300x slower than float32 (no kernels for it), and float16
has no fast CPU kernels anywhere. On CUDA, ``auto`` takes bfloat16 without a gradient scaler where
the GPU computes it natively (compute capability 8.0, Ampere, and newer), else float16 with the
scaler as the reference recipe does.

The probe's timing is noisy on a shared CPU, and bfloat16 and float32 masks differ in a few voxels:
its decision is taken once per machine (CPU model, torch's kernel level, torch version) and model
shape and kept in ``$XDG_CACHE_HOME/btcv-unetr/precision.json`` (``~/.cache`` without it), so the
same model and input give the same mask bytes at every start. Deleting the file, or an explicit
``--precision``, decides afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config.schema import PRECISIONS
from ..files import atomic_write_json
from .cache import cache_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bfloat16 must beat float32 by this factor in the probe: a tie is not worth the rounding.
PROBE_MARGIN = 0.9


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU as the bfloat16 decision sees it."""

    model: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "SVE256", "DEFAULT" ...
    avx512_bf16: bool
    amx_bf16: bool
    arm_bf16: bool

    @property
    def native_bf16(self) -> bool:
        """bfloat16 arithmetic in hardware, and torch's kernels built for that instruction level.

        Checking torch's level too keeps ``ATEN_CPU_CAPABILITY=avx2`` (and a build without AVX-512
        kernels) on the float32 side even where the flags are present.
        """
        x86 = self.capability.startswith("AVX512") and (self.avx512_bf16 or self.amx_bf16)
        return x86 or self.arm_bf16

    @property
    def bf16_isa(self) -> str:
        """The instructions that compute bfloat16 here, or torch's level when none do."""
        if self.amx_bf16 and self.native_bf16:
            return "AMX"
        if self.avx512_bf16 and self.native_bf16:
            return "AVX512-BF16"
        if self.arm_bf16:
            return "ARM BF16"
        return self.capability

    def as_dict(self) -> dict:
        return {"model": self.model, "capability": self.capability, "avx512_bf16": self.avx512_bf16,
                "amx_bf16": self.amx_bf16, "arm_bf16": self.arm_bf16, "native_bf16": self.native_bf16}


def _cpuinfo() -> tuple[str, set[str]]:
    """Model name and flags (x86 ``flags``, ARM ``Features``) from /proc/cpuinfo; empty where there is none."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "CPU part") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


@functools.cache
def cpu_features() -> CpuFeatures:
    model, flags = _cpuinfo()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    return CpuFeatures(
        model=model or platform.processor() or platform.machine(),
        capability=torch.backends.cpu.get_cpu_capability(),
        avx512_bf16="avx512_bf16" in flags,
        amx_bf16="amx_bf16" in flags,
        arm_bf16=arm and "bf16" in flags,
    )


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN builds its kernels on the first call
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# Voxels of the probe's convolution input: 48^3 (or a 333^2 picture) is large enough that float32
# takes oneDNN's kernel too, as in the model, not PyTorch's small-input fallback.
PROBE_VOXELS = 48 ** 3


def probe_layers(feature_size: int, hidden_size: int, mlp_dim: int, tokens: int,
                 spatial_dims: int = 3) -> list[tuple[nn.Module, torch.Tensor]]:
    """Two of the model's own layers with inputs: the decoder's 3x3(x3) convolution at ``feature_size``
    channels on a ``PROBE_VOXELS`` map of ``spatial_dims`` dimensions, and the ViT's MLP projection over
    ``tokens`` tokens (convolutions are about three quarters of a UNETR forward, the ViT most of the rest).

    The global random state is left as it was: a probe that runs (or, its decision cached, does not) must
    not change the weights a seeded training run initialises next."""
    side = round(PROBE_VOXELS ** (1 / spatial_dims))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(feature_size, feature_size, 3, padding=1)
        return [(conv, torch.randn(1, feature_size, *(side,) * spatial_dims)),
                (nn.Linear(hidden_size, mlp_dim), torch.randn(tokens, hidden_size))]


@functools.cache
def probe_bf16_speedup(feature_size: int, hidden_size: int, mlp_dim: int, tokens: int, spatial_dims: int = 3) -> float:
    """float32 time / bfloat16 autocast time of :func:`probe_layers` on this CPU (> 1: bf16 faster).

    About 0.1-0.3 s where bfloat16 is native; only called there.
    """
    layers = probe_layers(feature_size, hidden_size, mlp_dim, tokens, spatial_dims)

    def timed(bf16: bool):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for layer, example in layers:
                    layer(example)
        return run

    return _median_seconds(timed(False)) / _median_seconds(timed(True))


@dataclass
class Precision:
    """The autocast dtype of a run (``name`` fp32|bf16|fp16), why it was chosen, and its gradient scaler.

    float16 keeps a gradient scaler (small gradients underflow in float16); bfloat16 has float32's
    exponent range and needs none.
    """

    name: str
    reason: str
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {self.name!r}")
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def enabled(self) -> bool:
        """Whether autocast is on (anything below float32)."""
        return self.name != "fp32"

    def autocast(self, device: torch.device | None = None):
        device_type = device.type if device is not None else self.device_type
        return torch.autocast(device_type, dtype=self.dtype, enabled=self.enabled)

    def describe(self) -> str:
        return f"precision {self.name}: {self.reason}"

    def as_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason}


def _probe_tokens(roi_size: tuple[int, ...]) -> int:
    tokens = 1
    for size in roi_size:
        tokens *= max(1, size // 16)
    return tokens


def probe_shape(model) -> tuple:
    """What the probe of ``model`` (a ModelConfig) runs: for UNETR the arguments of :func:`probe_bf16_speedup`
    (feature size, hidden size, MLP size, tokens per window, spatial dimensions); for another network its name and
    the JSON of its settings, for the network probe the caller gives (``model.speed.network_bf16_speedup``)."""
    name = getattr(model, "model_name", "unetr")
    if name == "unetr":
        return (model.feature_size, model.hidden_size, model.mlp_dim, _probe_tokens(model.roi_size),
                model.spatial_dims)
    return (name, json.dumps(dataclasses.asdict(model), sort_keys=True))


CACHE_FILE = "precision.json"
CACHE_FORMAT = 1


def decision_key(features: CpuFeatures, shape: tuple) -> str:
    """What a probe's result depends on: the CPU, torch's kernels for it, and the model's layer shapes."""
    machine = f"{features.model} | {features.capability} | torch {torch.__version__}"
    if isinstance(shape[0], str):  # another network: its name and settings
        name, settings = shape
        return f"{machine} | {name} {hashlib.sha256(settings.encode()).hexdigest()[:16]}"
    feature_size, hidden_size, mlp_dim, tokens, spatial_dims = shape
    return f"{machine} | {spatial_dims}D feature {feature_size} hidden {hidden_size} mlp {mlp_dim} tokens {tokens}"


def _valid_record(record) -> bool:
    return (isinstance(record, dict) and record.get("precision") in ("fp32", "bf16")
            and isinstance(record.get("speedup"), (int, float)) and isinstance(record.get("decided"), str))


class DecisionCache:
    """The probe's decisions of this machine, one per :func:`decision_key`, in one small JSON file.

    Readers and writers hold an exclusive lock on ``precision.lock`` beside it, so two processes
    starting together take one decision, and neither loses the other's entry. Any problem with the
    folder or the file costs only the cache: one warning line, and the probe decides as before.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.problem: str | None = None
        self._decisions: dict[str, dict] = {}

    @classmethod
    def default(cls) -> DecisionCache:
        try:
            return cls(cache_folder() / CACHE_FILE)
        except RuntimeError as exc:  # Path.home() with neither HOME nor a password entry
            cache = cls(None)
            cache.problem = str(exc)
            return cache

    @contextlib.contextmanager
    def locked(self) -> Iterator[DecisionCache]:
        """The file's decisions read under the lock, held until the block ends."""
        if self.path is None:
            yield self
            return
        handle = None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = os.open(self.path.parent / "precision.lock", os.O_RDWR | os.O_CREAT, 0o600)
            handle = os.fdopen(descriptor, "r+")
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._decisions = self._read()
        except OSError as exc:
            self.problem = exc.strerror or str(exc)
        try:
            yield self
        finally:
            if handle is not None:
                handle.close()

    def _read(self) -> dict[str, dict]:
        try:
            content = json.loads(self.path.read_text())
            decisions = content["decisions"]
            if content.get("format") != CACHE_FORMAT or not isinstance(decisions, dict) or \
                    not all(_valid_record(record) for record in decisions.values()):
                raise ValueError("not the layout this version writes")
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSON and Unicode errors are ValueErrors
            print(f"warning: {self.path}: unreadable precision cache ({exc.__class__.__name__}); "
                  "ignoring it, deciding afresh and rewriting it", file=sys.stderr)
            return {}
        return decisions

    def get(self, key: str) -> dict | None:
        return self._decisions.get(key)

    def put(self, key: str, record: dict) -> bool:
        """Store ``record`` under ``key`` (call inside :meth:`locked`); False, with one warning, where it cannot."""
        if self.path is not None and self.problem is None:
            self._decisions[key] = record
            try:
                with contextlib.suppress(OSError):  # a folder made by another user keeps its mode
                    self.path.parent.chmod(0o700)
                atomic_write_json(self.path, {"format": CACHE_FORMAT, "decisions": self._decisions})
                return True
            except OSError as exc:
                self.problem = exc.strerror or str(exc)
        where = self.path or "the user's cache folder"
        print(f"warning: cannot keep the precision decision in {where} ({self.problem}): it is taken afresh at "
              "every start; set XDG_CACHE_HOME to a writable folder, or pass --precision", file=sys.stderr)
        return False


def _probe_choice(speedup: float) -> str:
    """bfloat16 where the probe found it faster than float32 by the margin."""
    return "fp32" if speedup * PROBE_MARGIN < 1.0 else "bf16"


def _probe_decision(features: CpuFeatures, name: str, speedup: float, decided: str = "",
                    kept_in: Path | None = None) -> Precision:
    """The probe's decision ``name`` with its reason; ``decided`` and ``kept_in`` say when one read from the
    cache was taken, and where it is kept."""
    probe = f"probe on {decided[:10]}" if decided else "probe"
    kept = f", kept in {kept_in}" if kept_in is not None else ""
    if name == "fp32":
        return Precision("fp32", f"this CPU has {features.bf16_isa}, but bfloat16 was not faster on this model's "
                                 f"layers ({probe}: {speedup:.2f}x float32{kept})")
    return Precision("bf16", f"this CPU computes bfloat16 natively ({features.bf16_isa}; {probe}: {speedup:.1f}x "
                             f"float32{kept})")


# A probe of a network other than UNETR: (name, JSON of its ModelConfig) -> float32 time / bfloat16 time. It builds
# the network, so it lives with the networks (model/speed.py) and is given by the caller.
NetworkProbe = Callable[[str, str], float]


def auto_cpu_precision(model, features: CpuFeatures | None = None,
                       network_probe: NetworkProbe | None = None) -> Precision:
    """``auto`` on the CPU: bfloat16 where it is native and the probe on ``model`` (a ModelConfig) finds it faster.
    UNETR's probe times its layer shapes here; another network's is ``network_probe`` (float32 without one).

    The probe runs once per machine and model shape: its decision is read back from the
    :class:`DecisionCache` at later starts, so that restarts do not flip between precisions.
    """
    features = features or cpu_features()
    if not features.native_bf16:
        return Precision("fp32", f"this CPU has no bfloat16 instructions ({features.bf16_isa})")
    shape = probe_shape(model)
    if isinstance(shape[0], str) and network_probe is None:
        return Precision("fp32", f"float32: no bfloat16 probe was given for {shape[0]} (--precision bf16 asks for it)")
    key = decision_key(features, shape)
    cache = DecisionCache.default()
    with cache.locked():
        record = cache.get(key)
        if record is not None:
            return _probe_decision(features, record["precision"], float(record["speedup"]), record["decided"],
                                   cache.path)
        speedup = network_probe(*shape) if isinstance(shape[0], str) else probe_bf16_speedup(*shape)
        chosen = _probe_decision(features, _probe_choice(speedup), speedup)
        cache.put(key, {"precision": chosen.name, "speedup": round(float(speedup), 3),
                        "decided": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return chosen


def auto_cuda_precision(device: torch.device) -> Precision:
    """``auto`` on a GPU: bfloat16 (no scaler) from compute capability 8.0, else float16 with the scaler."""
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return Precision("bf16", f"this GPU computes bfloat16 natively (compute capability {major}.{minor}); "
                                 "no gradient scaler needed", "cuda")
    return Precision("fp16", f"this GPU has no native bfloat16 (compute capability {major}.{minor}): float16 "
                             "with a gradient scaler", "cuda")


def runs_natively(name: str, device: torch.device) -> bool:
    """Whether precision ``name`` has fast kernels on ``device``."""
    if name == "fp32":
        return True
    if device.type == "cuda":
        return name == "fp16" or torch.cuda.get_device_capability(device)[0] >= 8
    return name == "bf16" and cpu_features().native_bf16


def resolve_precision(requested: str, device: torch.device, model, reason: str = "",
                      network_probe: NetworkProbe | None = None) -> Precision:
    """The :class:`Precision` for setting ``requested`` on ``device`` with ``model`` (a ModelConfig).

    ``reason`` explains an explicit choice (default: "asked for"). An explicit bf16/fp16 that has no
    fast kernels here still runs, with a warning on stderr. ``network_probe``: the bfloat16 probe of a network
    other than UNETR (``model.speed.network_bf16_speedup``).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        if device.type == "cuda":
            return auto_cuda_precision(device)
        return auto_cpu_precision(model, network_probe=network_probe)
    if not runs_natively(requested, device):
        where = f"this CPU ({cpu_features().bf16_isa})" if device.type == "cpu" else "this GPU"
        print(f"warning: precision {requested} has no fast kernels on {where}: expect it to run 10-300x slower "
              "than fp32 (--precision auto picks what is fast here)", file=sys.stderr)
    return Precision(requested, reason or f"asked for (--precision {requested})", device.type)
