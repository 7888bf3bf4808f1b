"""The machine record shared by every benchmark case: its facts, matmul peak and memory bandwidth, and the
timing tools (median of repeated runs, peak memory of a block, FLOP counts).

    machine_facts     CPU features, precision chosen, threads, torch version, GPU name
    run_precision     the precision ``main.py`` and ``test.py`` would take for a config here
    median_seconds    median wall time of repeated runs after a warm-up
    PeakMemory        peak CUDA allocation, or the process's resident set sampled every 5 ms
    matmul_peak, memory_bandwidth, count_flops
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from btcv_unetr.config.schema import Config
from btcv_unetr.model.speed import network_bf16_speedup
from btcv_unetr.runtime.precision import Precision, cpu_features, resolve_precision


def machine_facts(device: torch.device, precision: Precision) -> dict:
    """What the figures were taken on: the device type, CPU features, ``precision``, threads, torch, GPU name."""
    return {"device": device.type, **cpu_features().as_dict(), "precision": precision.as_dict(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def run_precision(config: Config, device: torch.device) -> Precision:
    """The precision ``main.py`` and ``test.py`` would take for ``config`` here (the probe runs once per process)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return resolve_precision(config.train.precision, device, config.model, network_probe=network_bf16_speedup)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run.

    PyTorch's ``Timer`` synchronises CUDA around each run; it is told to keep this process's thread
    count (it would otherwise time on one thread).
    """
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    timer.timeit(1)
    return statistics.median(timer.timeit(1).median for _ in range(repeats))


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak, or the process's resident set sampled every 5 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes, self._running = device, 0, False

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while self._running:
            self.peak_bytes = max(self.peak_bytes, self._rss())
            time.sleep(0.005)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._running = False
            self._thread.join()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an ``n x n`` matrix product (multiply-add counted as 2)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def memory_bandwidth(device: torch.device, repeats: int, megabytes: int = 512) -> float:
    """Bytes per second moved by copying a large tensor (read + write counted)."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / median_seconds(lambda: target.copy_(source), repeats)
