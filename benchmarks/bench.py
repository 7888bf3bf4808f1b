#!/usr/bin/env python
"""Speed of the reference-style path and of the fast path, measured in one process and one run.

    python benchmarks/bench.py [--device cpu|cuda] [--quick] [--out FILE.json]
    python benchmarks/bench.py --serve [--clients 4] [--serve_seconds 60] [--serve_checkpoint FILE]

Each time is the median of several timed repetitions after a warm-up run. All reference-style
figures are taken first, while glibc still has its default allocator, then the fast-path ones
(the allocator switch is process-wide). Figures: the matmul peak, UNETR forward and
forward+backward (FLOP/s and fraction of the peak), one training step as ``main.py`` takes it,
data-loading throughput, sliding-window inference of a BTCV-sized phantom end to end and for the
windows alone, the Dice of both inference paths on one trained tiny model, and the loss curves of
both training paths. ``--quick`` uses smaller shapes (demo-sized model, 128^2 phantoms).

``--serve`` runs a load check of ``btcv-unetr serve`` instead: N clients submit phantoms to a real
server process for a bounded time; figures are jobs per minute and submit-to-mask latency.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gzip
import io
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel
import numpy as np
import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference import InverseTransformPredictor, reference_style  # noqa: E402  (benchmarks/reference.py)

from btcv_unetr.allocator import keep_freed_memory  # noqa: E402
from btcv_unetr.config import CONFIG_DIR, Config, build_config  # noqa: E402
from btcv_unetr.config import _read_yaml as read_yaml  # noqa: E402
from btcv_unetr.data.datalist import load_config_split, make_dataset  # noqa: E402
from btcv_unetr.data.transforms import train_transforms  # noqa: E402
from btcv_unetr.distributed import Context, launch  # noqa: E402
from btcv_unetr.errors import UserError  # noqa: E402
from btcv_unetr.files import atomic_save_nifti, atomic_write_json  # noqa: E402
from btcv_unetr.inference.batch import run_inference, segment_case
from btcv_unetr.inference.cases import Case  # noqa: E402
from btcv_unetr.inference.predictor import Predictor
from btcv_unetr.inference.sliding_window import auto_sw_batch_size
from btcv_unetr.model.build import build_model  # noqa: E402
from btcv_unetr.model.checkpoint import load_checkpoint, stored_config  # noqa: E402
from btcv_unetr.model.precision import Precision, cpu_features, resolve_precision  # noqa: E402
from btcv_unetr.model.speed import compile_if_asked, memory_format_for, prepare_model, sdpa_for
from btcv_unetr.synthetic.phantoms import generate_case, write_dataset  # noqa: E402
from btcv_unetr.testing.checkpoints import seeded_checkpoint  # noqa: E402
from btcv_unetr.train.command import train_worker
from btcv_unetr.train.loop import micro_batch_size, train_step  # noqa: E402
from btcv_unetr.train.loss import build_loss  # noqa: E402
from btcv_unetr.train.optim import build_optimizer  # noqa: E402

UNETR_B = {"roi_x": 96, "roi_y": 96, "roi_z": 96, "feature_size": 16, "hidden_size": 768, "mlp_dim": 3072,
           "num_heads": 12}
DEMO_MODEL = {"roi_x": 64, "roi_y": 64, "roi_z": 64, "feature_size": 16, "hidden_size": 192, "mlp_dim": 768,
              "num_heads": 4}
TINY = {"model": {"roi_x": 32, "roi_y": 32, "roi_z": 32, "feature_size": 8, "hidden_size": 96, "mlp_dim": 192,
                  "num_heads": 4},
        "data": {"space_x": 6.0, "space_y": 6.0, "space_z": 6.0, "num_samples": 2, "workers": 0}}
# Seed 0, case 7 of the phantom set: 512 x 512 x 123 at 0.93 x 0.93 x 2.75 mm, a typical BTCV scan.
BTCV_LIKE_CASE = (0, 7)
SETTINGS = {
    "full": {"model": UNETR_B, "spacing": (1.5, 1.5, 2.0), "crops": 4, "matmul": 4096, "repeats": 3,
             "phantom_size": 512, "data_cases": 3, "dice_steps": 300, "loss_steps": 50,
             "picture": {"preset": "base", "size": 256, "batch": 8}},
    "quick": {"model": DEMO_MODEL, "spacing": (3.0, 3.0, 3.0), "crops": 2, "matmul": 2048, "repeats": 2,
              "phantom_size": 128, "data_cases": 2, "dice_steps": 60, "loss_steps": 20,
              "picture": {"preset": "lite", "size": 128, "batch": 4}},
}


def run_precision(config: Config, device: torch.device) -> Precision:
    """The precision ``main.py`` and ``test.py`` would take for ``config`` here (the probe runs once per process)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return resolve_precision(config.train.precision, device, config.model)


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


def module_profile(config: Config, device: torch.device, repeats: int) -> list[dict]:
    """Seconds and FLOPs of each top-level block of one forward pass (where the time goes)."""
    torch.manual_seed(0)
    precision = run_precision(config, device)
    model, layout = prepare_model(build_model(config.model).to(device).eval(), config.fast, device, precision.name,
                                  training=False)
    x = torch.randn(1, config.model.in_channels, *config.model.roi_size, device=device).contiguous(memory_format=layout)
    with FlopCounterMode(display=False) as counter:
        model(x)
    flops = {name.removeprefix(f"{type(model).__name__}."): sum(counts.values())
             for name, counts in counter.get_flop_counts().items()}
    seconds: dict[str, list[float]] = {name: [] for name, _ in model.named_children()}
    started: dict[str, float] = {}

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for name, child in model.named_children():
        child.register_forward_pre_hook(lambda *_, name=name: started.__setitem__(name, clock()))
        child.register_forward_hook(lambda *_, name=name: seconds[name].append(clock() - started[name]))
    for _ in range(repeats + 1):
        with torch.inference_mode(), precision.autocast(device):
            model(x)
    return [{"block": name, "seconds": statistics.median(times[1:]), "flops": flops.get(name, 0)}
            for name, times in seconds.items() if times]


def model_passes(config: Config, device: torch.device, repeats: int) -> dict:
    """UNETR forward (inference mode, as the Predictor runs it) and forward+backward times for one crop."""
    torch.manual_seed(0)
    precision = run_precision(config, device)
    model = build_model(config.model).to(device)
    x = torch.randn(1, config.model.in_channels, *config.model.roi_size, device=device)
    inference_model, inference_layout = prepare_model(copy.deepcopy(model), config.fast, device, precision.name,
                                                      training=False)
    x_inference = x.contiguous(memory_format=inference_layout)
    model, training_layout = prepare_model(model, config.fast, device, precision.name, training=True)
    x = x.contiguous(memory_format=training_layout)

    def forward():
        with torch.inference_mode(), precision.autocast(device):
            return inference_model(x_inference)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with precision.autocast(device):
            out = model(x)
        out.float().square().mean().backward()

    return {"forward_s": median_seconds(forward, repeats),
            "forward_backward_s": median_seconds(forward_backward, repeats)}


def step_function(config: Config, device: torch.device, seed: int) -> Callable[[torch.Tensor, torch.Tensor], float | None]:
    """A fresh model and optimiser (seeded) and a function taking one training step as ``main.py`` does."""
    torch.manual_seed(seed)
    precision = run_precision(config, device)
    model, layout = prepare_model(build_model(config.model).to(device).train(), config.fast, device, precision.name,
                                  training=True)
    optimizer = build_optimizer(model, config.train, fused=config.fast.fused_optimizer)
    loss_fn, _ = build_loss(config.train, config.model.out_channels, [], device)  # the benchmark's configs: unweighted
    context = Context(0, 1, 0, device)

    def step(image: torch.Tensor, label: torch.Tensor) -> float | None:
        micro = micro_batch_size(config.fast, device, image.shape[0], precision.name)
        return train_step(model, image.contiguous(memory_format=layout), label, loss_fn, optimizer, precision,
                          context, micro)
    return step


def training_step(config: Config, device: torch.device, repeats: int) -> dict:
    """One optimiser step of the recipe's batch of crops (loss, backward, AdamW), as ``main.py`` runs it."""
    step = step_function(config, device, seed=0)
    crops = config.data.num_samples * config.train.batch_size
    image = torch.randn(crops, config.model.in_channels, *config.model.roi_size, device=device)
    label = torch.randint(0, config.model.out_channels, (crops, 1, *config.model.roi_size), device=device).float()
    seconds = median_seconds(lambda: step(image, label), repeats)
    micro = micro_batch_size(config.fast, device, crops, run_precision(config, device).name)
    return {"step_s": seconds, "crops": crops, "micro_batch": micro}


def window_seconds(config: Config, device: torch.device, repeats: int, windows: int = 1) -> float:
    """Seconds per window of a forward pass over ``windows`` windows, as the Predictor runs it."""
    torch.manual_seed(0)
    precision = run_precision(config, device)
    model, layout = prepare_model(build_model(config.model).to(device).eval(), config.fast, device, precision.name,
                                  training=False)
    model = compile_if_asked(model, config.fast)
    x = torch.randn(windows, config.model.in_channels, *config.model.roi_size, device=device)
    x = x.contiguous(memory_format=layout)

    def forward():
        with torch.inference_mode(), precision.autocast(device):
            return model(x)
    return median_seconds(forward, repeats) / windows


def switch_ablation(config: Config, device: torch.device, repeats: int) -> list[dict]:
    """Each fast-path switch against its alternative on this machine, everything else as chosen here.

    One row per switch and stage: the chosen setting and its seconds (per window for inference, per
    step for training), the alternative and its seconds. The allocator switch is process-wide and
    is measured last.
    """
    fast, rows = config.fast, []
    precision = run_precision(config, device)
    crops = config.data.num_samples * config.train.batch_size

    def variant(**changes) -> Config:
        return dataclasses.replace(config, fast=dataclasses.replace(fast, **changes))

    def add(switch: str, stage: str, chosen: str, chosen_s: float, alternative: str, alternative_s: float) -> None:
        rows.append({"switch": switch, "stage": stage, "chosen": chosen, "chosen_s": chosen_s,
                     "alternative": alternative, "alternative_s": alternative_s})
        print(f"  {switch:16s} {stage:9s} {chosen:>4s} {chosen_s:7.3f} s   {alternative:>4s} {alternative_s:7.3f} s",
              flush=True)

    def forward(c: Config, windows: int = 1) -> float:
        return window_seconds(c, device, repeats, windows)

    def step(c: Config) -> float:
        return training_step(c, device, repeats)["step_s"]

    on_off = {True: "on", False: "off"}
    windows = auto_sw_batch_size(config.infer.sw_batch_size, device, config.model.roi_size,
                                 config.model.feature_size, precision.name)
    base_forward, base_step = forward(config, windows), step(config)
    for stage, measure, base, training in (("inference", lambda c: forward(c, windows), base_forward, False),
                                           ("training", step, base_step, True)):
        layout = memory_format_for(fast, device, precision.name, training) == torch.channels_last_3d
        add("channels_last", stage, on_off[layout], base, on_off[not layout], measure(variant(channels_last=not layout)))
        sdpa = sdpa_for(fast, device, precision.name)
        add("sdpa", stage, on_off[sdpa], base, on_off[not sdpa], measure(variant(sdpa=not sdpa)))
    for other in (1, 2, 4):
        if other != windows:
            add("sw_batch_size", "inference", str(windows), base_forward, str(other), forward(config, other))
    micro = micro_batch_size(fast, device, crops, precision.name)
    other = crops if micro != crops else 1
    add("micro_batch", "training", str(micro), base_step, str(other), step(variant(micro_batch=other)))
    add("fused_optimizer", "training", "on", base_step, "off", step(variant(fused_optimizer=False)))
    add("compile", "inference", "off", base_forward, "on", forward(variant(compile=True), windows))
    keep_freed_memory(False)
    add("malloc_tuning", "inference", "on", base_forward, "off", forward(config, windows))
    add("malloc_tuning", "training", "on", base_step, "off", step(config))
    keep_freed_memory(True)
    return rows


def data_throughput(config: Config) -> dict:
    """Cases per second through the random transforms of cached cases (the per-step input work)."""
    items = load_config_split(config.data, "training")
    started = time.perf_counter()
    dataset = make_dataset(items, train_transforms(config), config.data)
    cache_s = (time.perf_counter() - started) / len(items)
    rounds = 3
    started = time.perf_counter()
    for _ in range(rounds):
        for index in range(len(dataset)):
            dataset[index]
    per_case = (time.perf_counter() - started) / (rounds * len(dataset))
    return {"cache_s_per_case": cache_s, "random_s_per_case": per_case, "cases_per_s": 1 / per_case}


def inference(predictor_class: type[Predictor], config: Config, scan: Path, out_dir: Path, repeats: int,
              device: torch.device) -> dict:
    """Seconds per scan end to end (read, preprocess, windows, invert, write) and for the windows alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = predictor_class(config)
        case = Case(scan.name.split(".")[0], scan)
        with PeakMemory(device) as memory:
            end_to_end = median_seconds(lambda: segment_case(predictor, case, out_dir, config), repeats)
        image = predictor.transform({"image": str(scan)})["image"]
        windows = median_seconds(lambda: predictor.probabilities(image), repeats)
    return {"end_to_end_s": end_to_end, "windows_s": windows, "peak_memory_gb": memory.peak_bytes / 1e9,
            "sw_batch_size": predictor.sw_batch_size, "preprocessed_shape": list(image.shape[1:])}


def picture_config(settings: dict, device: str) -> Config:
    """The 2D case: an RGB UNETR of the setting's preset on square pictures, a batch of pictures per step."""
    picture = settings["picture"]
    size = picture["size"]
    return build_config([read_yaml(CONFIG_DIR / f"preset_{picture['preset']}.yaml"),
                         {"model": {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "roi_x": size,
                                    "roi_y": size},
                          "data": {"num_samples": 1}, "train": {"batch_size": picture["batch"]},
                          "infer": {"device": device}}])


def picture_figures(config: Config, device: torch.device, repeats: int) -> dict:
    """Pictures per second through one forward pass (inference) and training steps per second."""
    forward_s = model_passes(config, device, repeats)["forward_s"]
    step = training_step(config, device, repeats)
    return {"images_per_s": 1.0 / forward_s, "train_steps_per_s": 1.0 / step["step_s"], "batch": step["crops"],
            "size": list(config.model.roi_size)}


def loss_curve(config: Config, batches: list[dict], device: torch.device, seed: int) -> list[float]:
    """Training losses over ``batches`` (the same crops for every path) from a model seeded with ``seed``."""
    step = step_function(config, device, seed)
    return [step(batch["image"].as_tensor().to(device), batch["label"].as_tensor().to(device)) for batch in batches]


def tiny_batches(config: Config, steps: int) -> list[dict]:
    """``steps`` training batches of the tiny config, drawn once with a fixed seed."""
    dataset = make_dataset(load_config_split(config.data, "training"), train_transforms(config), config.data)
    dataset.transform.set_random_state(seed=0)
    batches = []
    while len(batches) < steps:
        for index in range(len(dataset)):
            crops = dataset[index]
            batches.append({key: torch.stack([crop[key] for crop in crops]) for key in ("image", "label")})
    return batches[:steps]


def train_tiny(config: Config) -> Path:
    """Train the tiny model of the Dice check; returns its checkpoint."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        launch(train_worker, config)
    return Path(config.train.logdir) / "model_final.pt"


def segment_folder(predictor_class: type[Predictor], config: Config) -> float:
    """Mean organ Dice over the datalist's validation cases, segmented by ``predictor_class``."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        summary = run_inference(config, predictor_class(config))
    return float(summary["mean_organ_dice"])


def configs(settings: dict, device: str, data_dir: Path, weights: Path | None = None) -> tuple[Config, Config]:
    """(reference-style, fast) configs of the benchmark's model and data; inference loads ``weights``."""
    space_x, space_y, space_z = settings["spacing"]
    layer = {"model": settings["model"],
             "data": {"data_dir": str(data_dir), "json_list": "dataset.json", "num_samples": settings["crops"],
                      "space_x": space_x, "space_y": space_y, "space_z": space_z, "workers": 0},
             "infer": {"device": device, "overlay": False, "hd95": False, "overwrite": True}}
    if weights is not None:
        layer["train"] = {"pretrained_dir": str(weights.parent), "pretrained_model_name": weights.name}
    fast = build_config([layer])
    return reference_style(fast), fast


def run(args: argparse.Namespace) -> dict:
    settings = SETTINGS["quick" if args.quick else "full"]
    device = torch.device(args.device)
    repeats = args.repeats or settings["repeats"]
    work = Path(tempfile.mkdtemp(prefix="btcv_bench_"))
    log = print if not args.silent else (lambda *a, **k: None)

    log(f"phantoms ({settings['phantom_size']}^2 in-plane) in {work}")
    data_dir = work / "data"
    write_dataset(data_dir, settings["data_cases"], seed=1, size=settings["phantom_size"], progress=False)
    seed, index = BTCV_LIKE_CASE
    scan = work / "scan.nii.gz"
    atomic_save_nifti(generate_case(seed, index, settings["phantom_size"]).image, scan)
    tiny_dir = work / "tiny"
    write_dataset(tiny_dir, 10, seed=3, size=64, progress=False)  # 8 training, 2 validation cases
    reference, fast = configs(settings, args.device, data_dir)
    torch.manual_seed(0)  # speed does not depend on the weights: a random model segments the scan
    weights = work / "weights.pth"
    torch.save(build_model(fast.model).state_dict(), weights)
    reference, fast = configs(settings, args.device, data_dir, weights)
    tiny_ref, tiny_fast = configs({**settings, "model": TINY["model"], "spacing": (6.0, 6.0, 6.0), "crops": 2},
                                  args.device, tiny_dir)
    batches = tiny_batches(tiny_fast, settings["loss_steps"])
    picture_fast = picture_config(settings, args.device)
    pictures = {"reference": reference_style(picture_fast), "fast": picture_fast}

    if args.dice_checkpoint:
        checkpoint, dice_data = args.dice_checkpoint.resolve(), args.dice_data.resolve()
        log(f"Dice check: {checkpoint} on the validation cases of {dice_data}")
    else:
        log("training the tiny model of the Dice check")
        tiny_dice = build_config([tiny_fast.to_dict(), {
            "train": {"logdir": str(work / "tiny_run"), "max_epochs": 10_000, "max_steps": settings["dice_steps"],
                      "val_every": 10_000, "optim_lr": 3e-3, "warmup_epochs": 2, "seed": 0},
            "data": {"crop_sampler": "classes"}}])
        checkpoint, dice_data = train_tiny(tiny_dice), tiny_dir
        keep_freed_memory(False)  # training turned the fast allocator on; the reference phase needs glibc's default
    # A training checkpoint brings its own architecture and preprocessing to inference.
    dice_configs = dict(zip(("reference", "fast"), configs(settings, args.device, dice_data, checkpoint)))

    results: dict = {"reference": {}, "fast": {}}
    paths = (("reference", reference, tiny_ref, InverseTransformPredictor), ("fast", fast, tiny_fast, Predictor))
    for name, config, tiny, predictor_class in paths:
        keep_freed_memory(config.fast.malloc_tuning)
        log(f"{name} path")
        out = results[name]
        out["model"] = model_passes(config, device, repeats)
        log(f"  forward {out['model']['forward_s']:.3f} s, forward+backward {out['model']['forward_backward_s']:.3f} s")
        out["train_step"] = training_step(config, device, repeats)
        log(f"  training step {out['train_step']['step_s']:.2f} s")
        out["inference"] = inference(predictor_class, config, scan, work / f"masks_{name}", repeats, device)
        log(f"  inference {out['inference']['end_to_end_s']:.2f} s per scan, windows {out['inference']['windows_s']:.2f} s")
        dice_config = build_config([dice_configs[name].to_dict(), {"infer": {"output_dir": str(work / f"dice_{name}")}}])
        out["dice"] = segment_folder(predictor_class, dice_config)
        log(f"  mean organ Dice of the {'given' if args.dice_checkpoint else 'tiny'} model {out['dice']:.4f}")
        out["loss_curve"] = loss_curve(tiny, batches, device, seed=0)
        out["picture"] = picture_figures(pictures[name], device, repeats)
        log(f"  2D: {out['picture']['images_per_s']:.1f} pictures/s, {out['picture']['train_steps_per_s']:.2f} "
            "training steps/s")
    results["reference"]["loss_curve_other_seed"] = loss_curve(tiny_ref, batches, device, seed=1)
    keep_freed_memory(True)

    results["fast"]["forward_profile"] = module_profile(fast, device, repeats)
    results["data"] = data_throughput(fast)
    model = build_model(fast.model)
    x = torch.randn(1, 1, *fast.model.roi_size)
    forward_flops = count_flops(lambda: model(x))
    forward_backward_flops = count_flops(lambda: model(x).square().mean().backward())
    # The peak of the precision the fast path runs in (a bfloat16 matmul where it is not native would take minutes).
    chosen = run_precision(fast, device)
    peak = {"fp32_flops": matmul_peak(device, torch.float32, settings["matmul"], repeats),
            "memory_bytes_per_s": memory_bandwidth(device, repeats), "chosen_dtype": chosen.name}
    peak["chosen_flops"] = peak["fp32_flops"] if chosen.name == "fp32" else \
        matmul_peak(device, chosen.dtype, settings["matmul"], repeats)
    results["peak"] = peak
    results["flops"] = {"forward": forward_flops, "forward_backward": forward_backward_flops,
                        "train_step": forward_backward_flops * fast.data.num_samples}
    results["machine"] = machine_facts(device, chosen)
    results["settings"] = {"mode": "quick" if args.quick else "full", "repeats": repeats,
                           "model": settings["model"], "spacing_mm": settings["spacing"],
                           "scan_shape": list(generate_case(seed, index, settings["phantom_size"]).image.shape),
                           "dice_steps": settings["dice_steps"], "loss_steps": settings["loss_steps"],
                           "dice_checkpoint": str(checkpoint) if args.dice_checkpoint else None}
    results["summary"] = summarise(results)
    return results


def machine_facts(device: torch.device, precision: Precision) -> dict:
    return {"device": device.type, **cpu_features().as_dict(), "precision": precision.as_dict(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def run_switches(args: argparse.Namespace) -> dict:
    """The switch ablation alone, on the benchmark's model (``--quick``: the demo's)."""
    settings = SETTINGS["quick" if args.quick else "full"]
    device = torch.device(args.device)
    config = build_config([{"model": settings["model"], "data": {"num_samples": settings["crops"]},
                            "infer": {"device": args.device}}])
    keep_freed_memory(True)
    precision = run_precision(config, device)
    repeats = args.repeats or settings["repeats"]
    print(f"{precision.describe()}; each switch against its alternative (median of {repeats})")
    return {"machine": machine_facts(device, precision), "model": settings["model"], "repeats": repeats,
            "switches": switch_ablation(config, device, repeats)}


def switch_table(r: dict) -> str:
    m = r["machine"]
    lines = [f"machine: {m['gpu'] or m['model']}, {m['capability']} kernels, precision {m['precision']['name']}",
             f"{'switch':16s} {'stage':9s} {'chosen':>14s} {'alternative':>14s} {'alternative/chosen':>19s}"]
    for row in r["switches"]:
        lines.append(f"{row['switch']:16s} {row['stage']:9s} {row['chosen']:>5s} {row['chosen_s']:7.3f} s "
                     f"{row['alternative']:>5s} {row['alternative_s']:7.3f} s {row['alternative_s'] / row['chosen_s']:18.2f}x")
    return "\n".join(lines)


def summarise(r: dict) -> dict:
    ref, fast, peak, flops = r["reference"], r["fast"], r["peak"], r["flops"]
    last = max(1, len(fast["loss_curve"]) // 5)

    def tail_gap(a: list[float], b: list[float]) -> float:
        return statistics.mean(abs(x - y) for x, y in zip(a[-last:], b[-last:]))

    return {
        "forward_speedup": ref["model"]["forward_s"] / fast["model"]["forward_s"],
        "train_step_speedup": ref["train_step"]["step_s"] / fast["train_step"]["step_s"],
        "inference_speedup": ref["inference"]["end_to_end_s"] / fast["inference"]["end_to_end_s"],
        "windows_speedup": ref["inference"]["windows_s"] / fast["inference"]["windows_s"],
        "forward_fraction_of_peak": flops["forward"] / fast["model"]["forward_s"] / peak["chosen_flops"],
        "train_step_fraction_of_peak": flops["train_step"] / fast["train_step"]["step_s"] / peak["chosen_flops"],
        "reference_forward_fraction_of_fp32_peak": flops["forward"] / ref["model"]["forward_s"] / peak["fp32_flops"],
        "dice_difference": abs(ref["dice"] - fast["dice"]),
        "loss_gap_fast_vs_reference": tail_gap(fast["loss_curve"], ref["loss_curve"]),
        "loss_gap_seed_to_seed": tail_gap(ref["loss_curve_other_seed"], ref["loss_curve"]),
        "input_bound": r["data"]["random_s_per_case"] > fast["train_step"]["step_s"],
        "picture_inference_speedup": fast["picture"]["images_per_s"] / ref["picture"]["images_per_s"],
        "picture_train_step_speedup": fast["picture"]["train_steps_per_s"] / ref["picture"]["train_steps_per_s"],
    }


def table(r: dict) -> str:
    ref, fast, s = r["reference"], r["fast"], r["summary"]
    rows = [
        ("forward pass, s", ref["model"]["forward_s"], fast["model"]["forward_s"], s["forward_speedup"]),
        ("forward+backward, s", ref["model"]["forward_backward_s"], fast["model"]["forward_backward_s"],
         ref["model"]["forward_backward_s"] / fast["model"]["forward_backward_s"]),
        (f"training step ({fast['train_step']['crops']} crops), s", ref["train_step"]["step_s"],
         fast["train_step"]["step_s"], s["train_step_speedup"]),
        ("inference per scan, end to end, s", ref["inference"]["end_to_end_s"], fast["inference"]["end_to_end_s"],
         s["inference_speedup"]),
        ("inference, windows alone, s", ref["inference"]["windows_s"], fast["inference"]["windows_s"],
         s["windows_speedup"]),
        ("inference peak memory, GB", ref["inference"]["peak_memory_gb"], fast["inference"]["peak_memory_gb"], None),
        ("mean organ Dice (Dice check model)", ref["dice"], fast["dice"], None),
        (f"2D {'x'.join(map(str, fast['picture']['size']))} RGB pictures per s", ref["picture"]["images_per_s"],
         fast["picture"]["images_per_s"], s["picture_inference_speedup"]),
        (f"2D training steps ({fast['picture']['batch']} pictures) per s", ref["picture"]["train_steps_per_s"],
         fast["picture"]["train_steps_per_s"], s["picture_train_step_speedup"]),
    ]
    lines = [f"{'':40s} {'reference':>10s} {'fast':>10s} {'ratio':>7s}"]
    for name, a, b, ratio in rows:
        lines.append(f"{name:40s} {a:10.3f} {b:10.3f} {'' if ratio is None else f'{ratio:6.2f}x':>7s}")
    p, m = r["peak"], r["machine"]
    lines += [
        f"machine: {m['gpu'] or m['model']}, {m['threads']} threads, torch {m['torch']} ({m['capability']} kernels, "
        f"avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, amx_bf16 {'yes' if m['amx_bf16'] else 'no'})",
        f"fast path precision {m['precision']['name']}: {m['precision']['reason']}",
        f"matmul peak: fp32 {p['fp32_flops'] / 1e9:.0f} GFLOP/s"
        + (f", {p['chosen_dtype']} {p['chosen_flops'] / 1e9:.0f} GFLOP/s" if p["chosen_dtype"] != "fp32" else ""),
        f"fast forward {s['forward_fraction_of_peak']:.0%} and training step {s['train_step_fraction_of_peak']:.0%} "
        f"of the {p['chosen_dtype']} peak ({r['flops']['forward'] / 1e9:.0f} GFLOP per forward)",
        f"Dice difference {s['dice_difference']:.4f}; loss gap fast vs reference {s['loss_gap_fast_vs_reference']:.4f} "
        f"(seed to seed {s['loss_gap_seed_to_seed']:.4f})",
        f"data: {r['data']['cases_per_s']:.1f} cases/s through the random transforms "
        f"({'input' if s['input_bound'] else 'compute'}-bound); memory copy {p['memory_bytes_per_s'] / 1e9:.0f} GB/s",
        "fast forward by block:  block       ms   GFLOP  GFLOP/s",
    ]
    for row in fast["forward_profile"]:
        rate = row["flops"] / row["seconds"] / 1e9 if row["seconds"] else 0.0
        lines.append(f"{'':23s} {row['block']:9s} {row['seconds'] * 1e3:6.0f} {row['flops'] / 1e9:7.1f} {rate:8.0f}")
    return "\n".join(lines)


# --- the service under load (--serve) ------------------------------------------------------------------

SERVE_POLL_S = 0.15  # between two GETs of a job's state (the API contract asks clients for 0.1-0.2 s)
SERVE_STARTUP_S = 180  # importing torch and MONAI and loading the model, on a busy small machine
SERVE_STOP_S = 20  # after SIGINT the server lets its running job finish; then it is killed
SERVE_JOB_LIMIT_S = 900  # a job with no result after this long counts as failed (a hung server)
SERVE_SEED = 11  # the phantom set the clients upload


class ServeCheckError(RuntimeError):
    """The serve check cannot run: the server did not start, or its model does not take the phantoms."""


def tiny_checkpoint(folder: Path) -> Path:
    """A training checkpoint of the benchmark's tiny model with seeded random weights (the service's speed
    does not depend on them); it carries its config, so the server builds the same tiny UNETR."""
    return seeded_checkpoint(folder / "model.pt", build_config([TINY]))


def checkpoint_precision(checkpoint: Path, device: torch.device) -> Precision:
    """What ``auto`` resolves to here for the checkpoint's model. The server is given this precision, so the
    figures recorded with it are those the jobs ran in. Files without a config (a bare state dict, TorchScript)
    are taken to hold the default model."""
    try:
        config = stored_config(load_checkpoint(checkpoint), str(checkpoint))
    except UserError:
        config = None
    with contextlib.redirect_stderr(io.StringIO()):
        return resolve_precision("auto", device, (config or build_config([])).model)


def serve_scans(folder: Path, sizes: tuple[int, ...]) -> list[Path]:
    """Two distinct phantom scans of each size (voxels square in-plane; 512 is BTCV's 512 x 512 x ~100-200),
    interleaved, that the clients take turns uploading."""
    per_size = []
    for size in sizes:
        write_dataset(folder / str(size), cases=2, seed=SERVE_SEED, size=size, test_cases=2, progress=False)
        per_size.append(sorted((folder / str(size) / "imagesTs").glob("*.nii.gz")))
    return [scan for pair in zip(*per_size) for scan in pair]


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the OS picks it; the server binds it moments later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, url: str, log_path: Path) -> None:
    """Return once ``GET /health`` answers 200; a server that exits or stays silent raises with its log's end."""
    import httpx
    deadline = time.monotonic() + SERVE_STARTUP_S
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise ServeCheckError(f"btcv-unetr serve did not start (exit status {process.poll()}); end of "
                                  f"{log_path}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)


def stop_process(process: subprocess.Popen) -> None:
    """SIGINT (uvicorn's graceful shutdown: the job worker stops), then kill after ``SERVE_STOP_S`` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=SERVE_STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclasses.dataclass(frozen=True)
class ServerProcess:
    url: str
    process: subprocess.Popen

    def peak_memory_bytes(self) -> int | None:
        """The server process's peak resident memory so far (Linux ``VmHWM``), None where it cannot be read."""
        try:
            with open(f"/proc/{self.process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


@contextlib.contextmanager
def serve_process(checkpoint: Path, jobs_dir: Path, flags: list[str], log_path: Path,
                  threads: int | None = None) -> Iterator[ServerProcess]:
    """``btcv-unetr serve`` in its own process on a free loopback port; yields it once it answers and stops
    it afterwards. Its output goes to ``log_path``; ``threads`` caps its OpenMP threads."""
    port = free_port()
    argv = [sys.executable, "-m", "btcv_unetr", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
            "--port", str(port), "--jobs_dir", str(jobs_dir), *flags]
    root = str(Path(__file__).resolve().parent.parent)
    # The server imports the btcv_unetr this bench imports, whatever the working folder.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, log_path)
        yield ServerProcess(url, process)
    finally:
        stop_process(process)


def declared_nifti_gz(shape: tuple[int, ...], zooms: tuple[float, ...], dtype=np.int16, data_bytes: int | None = None,
                      fill: float = 0) -> bytes:
    """A ``.nii.gz`` whose header declares ``shape``, with ``data_bytes`` bytes of voxels (default: all of them)
    of value ``fill``, compressed as it is generated: a gigavoxel of zeros is a megabyte (a decompression bomb)."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms(zooms)
    header.set_data_offset(352)
    header.set_qform(np.diag([*zooms, 1.0]), code=1)
    header.set_sform(np.diag([*zooms, 1.0]), code=1)
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize if data_bytes is None else data_bytes
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as stream:
        stream.write(header.binaryblock + b"\x00" * 4)  # 348-byte header, empty extension flag: voxels at 352
        chunk = np.full(1 << 19, fill, dtype).tobytes()
        while total > 0:
            stream.write(chunk[:min(total, len(chunk))])
            total -= len(chunk)
    return out.getvalue()


BOMB_SHAPE = (1024, 1024, 512)  # the 1 MB upload that once held the worker for 2 minutes and 7 GB


def post_bomb(url: str, token: str, bomb: bytes, delay_s: float) -> dict:
    """After ``delay_s``, upload ``bomb`` once: its status and the seconds until the answer (it must be refused
    from its header, without slowing the other clients' jobs)."""
    import httpx
    time.sleep(delay_s)
    started = time.perf_counter()
    response = httpx.post(f"{url}/jobs", files={"file": ("bomb.nii.gz", bomb, "application/gzip")},
                          headers={"Authorization": f"Bearer {token}"}, timeout=SERVE_JOB_LIMIT_S)
    return {"status": response.status_code, "answer_s": time.perf_counter() - started,
            "detail": answer_detail(response), "bytes": len(bomb)}


@dataclasses.dataclass
class ClientTally:
    """What one client saw. Latencies are submit-to-mask seconds of its completed jobs, ``server_s`` the
    seconds the server's job records give for the same jobs."""

    latencies_s: list[float] = dataclasses.field(default_factory=list)
    server_s: list[float] = dataclasses.field(default_factory=list)
    refused: int = 0  # 503 answers (queue full), each retried after its Retry-After
    failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors.append(why)


def answer_detail(response) -> str:
    """``STATUS detail`` of an error answer (the service's errors are JSON ``{"detail": ...}``)."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text[:200]
    return f"{response.status_code} {detail}"


def submit_job(client, scan: Path, deadline: float, tally: ClientTally) -> str | None:
    """POST /jobs until it is accepted; returns the job id. A 503 (queue full) is counted and retried after its
    Retry-After seconds, unless that wait ends past ``deadline`` (None: not submitted, not a failure)."""
    while True:
        with open(scan, "rb") as data:
            response = client.post("/jobs", files={"file": (scan.name, data, "application/gzip")})
        if response.status_code == 202:
            return response.json()["id"]
        if response.status_code != 503:
            tally.fail(f"POST /jobs: {answer_detail(response)}")
            return None
        tally.refused += 1
        wait_s = float(response.headers.get("Retry-After", "1"))
        if time.perf_counter() + wait_s > deadline:
            return None
        time.sleep(wait_s)


def await_job(client, job_id: str) -> dict:
    """The job's record once it is done or failed, polled every ``SERVE_POLL_S`` seconds."""
    started = time.perf_counter()
    while True:
        response = client.get(f"/jobs/{job_id}")
        if response.status_code != 200:
            return {"state": "failed", "error": f"GET /jobs/{job_id}: {answer_detail(response)}"}
        job = response.json()
        if job["state"] in ("done", "failed"):
            return job
        if time.perf_counter() - started > SERVE_JOB_LIMIT_S:
            return {**job, "state": "failed", "error": f"no result after {SERVE_JOB_LIMIT_S} s"}
        time.sleep(SERVE_POLL_S)


def one_job(client, scan: Path, deadline: float, tally: ClientTally) -> None:
    """Submit ``scan``, wait for its job and download the mask. The latency counts from the first POST,
    refusals and their waits included: it is what a user of the service waits."""
    submitted = time.perf_counter()
    job_id = submit_job(client, scan, deadline, tally)
    if job_id is None:
        return
    job = await_job(client, job_id)
    if job["state"] == "failed":
        tally.fail(f"job {job_id}: {job['error']}")
        return
    mask = client.get(f"/jobs/{job_id}/mask")
    if mask.status_code != 200 or not mask.content:
        tally.fail(f"GET /jobs/{job_id}/mask: {answer_detail(mask)}")
        return
    tally.latencies_s.append(time.perf_counter() - submitted)
    tally.server_s.append(float(job["seconds"]))


def serve_client(url: str, token: str, scans: list[Path], deadline: float, tally: ClientTally, first: int) -> None:
    """One client (its own connection pool): jobs one after another until ``deadline`` (``time.perf_counter()``
    seconds), then its last job to the end. A transport error (the server gone) stops the client."""
    import httpx
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
        index = first
        while time.perf_counter() < deadline:
            try:
                one_job(client, scans[index % len(scans)], deadline, tally)
            except httpx.HTTPError as exc:
                tally.fail(f"{exc.__class__.__name__}: {exc}")
                return
            index += 1


def warm_up(url: str, token: str, scan: Path) -> float:
    """Seconds of one job through POST /segment before the clock starts: the first inference's one-time costs
    (kernel selection, first allocations) are not part of the steady-state figures."""
    import httpx
    started = time.perf_counter()
    with open(scan, "rb") as data:
        response = httpx.post(f"{url}/segment", files={"file": (scan.name, data, "application/gzip")},
                              headers={"Authorization": f"Bearer {token}"}, timeout=SERVE_JOB_LIMIT_S)
    if response.status_code != 200:
        raise ServeCheckError(f"the warm-up job failed: POST /segment: {answer_detail(response)}")
    return time.perf_counter() - started


def run_clients(url: str, token: str, scans: list[Path], clients: int, seconds: float,
                bomb: bytes | None = None) -> tuple[list[ClientTally], float, dict | None]:
    """``clients`` threads submitting for ``seconds``, and ``bomb`` uploaded once halfway; returns their tallies,
    the seconds until the last of them finished its last job, and the bomb's answer."""
    tallies = [ClientTally() for _ in range(clients)]
    started = time.perf_counter()
    threads = [threading.Thread(target=serve_client, args=(url, token, scans, started + seconds, tally, index),
                                name=f"client {index}", daemon=True) for index, tally in enumerate(tallies)]
    for thread in threads:
        thread.start()
    answer = post_bomb(url, token, bomb, seconds / 2) if bomb is not None else None
    for thread in threads:
        thread.join()
    return tallies, time.perf_counter() - started, answer


def percentile(values: list[float], fraction: float) -> float | None:
    """numpy's percentile (linear between the closest ranks) at ``fraction``; None for no values."""
    return float(np.percentile(values, 100 * fraction)) if values else None


def serve_load(work: Path, clients: int = 4, seconds: float = 60.0, sizes: tuple[int, ...] = (64,),
               device: str = "cpu", checkpoint: Path | None = None, server_threads: int | None = None,
               bomb: bool = True, log: Callable[..., None] = print) -> dict:
    """The load check: ``clients`` clients submit phantoms (``sizes``: voxels square in-plane, taken in turn)
    to a real ``btcv-unetr serve`` for ``seconds`` seconds, then wait for their last jobs; with ``bomb``, one
    1 MB upload declaring a gigavoxel comes halfway. The server's peak memory is read at the end.

    ``checkpoint`` defaults to the tiny model (written under ``work``). The server gets a queue with room
    for every client, a token of its own (so a ``BTCV_UNETR_TOKEN`` in the environment does not lock the
    clients out) and the precision ``auto`` resolves to here. Times are seconds.
    """
    import httpx  # the test extra's HTTP client: only the serve check needs it
    torch_device = torch.device(device)
    named = checkpoint is not None
    checkpoint = checkpoint or tiny_checkpoint(work / "model")
    precision = checkpoint_precision(checkpoint, torch_device)
    scans = serve_scans(work / "phantoms", sizes)
    bomb_bytes = declared_nifti_gz(BOMB_SHAPE, (1.0, 1.0, 1.0)) if bomb else None
    token = secrets.token_hex(16)
    flags = ["--device", device, "--precision", precision.name, "--workers_queue", str(clients), "--token", token]
    log(f"btcv-unetr serve on {device} ({precision.name}), {clients} clients for {seconds:g} s; "
        f"server log {work / 'server.log'}")
    with serve_process(checkpoint, work / "jobs", flags, work / "server.log", server_threads) as server:
        url = server.url
        info = httpx.get(f"{url}/info", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        if info["spatial_dims"] != 3:
            raise ServeCheckError(f"{checkpoint} is a {info['spatial_dims']}D model: the serve check uploads CT "
                                  "volumes")
        warmup_s = warm_up(url, token, scans[0])
        log(f"  warm-up job {warmup_s:.2f} s")
        tallies, elapsed_s, bomb_answer = run_clients(url, token, scans, clients, seconds, bomb_bytes)
        peak_memory = server.peak_memory_bytes()
    latencies = [value for tally in tallies for value in tally.latencies_s]
    server_s = [value for tally in tallies for value in tally.server_s]
    machine = machine_facts(torch_device, precision)
    if server_threads is not None:
        machine["threads"] = server_threads
    return {
        "clients": clients, "serve_seconds": seconds, "elapsed_s": elapsed_s, "phantom_sizes": list(sizes),
        "scan_shapes": [list(nibabel.load(str(scan)).shape) for scan in scans],
        "checkpoint": str(checkpoint) if named else "tiny model (random weights)",
        "completed": len(latencies), "failed": sum(tally.failed for tally in tallies),
        "refused_503": sum(tally.refused for tally in tallies),
        "jobs_per_minute": 60.0 * len(latencies) / elapsed_s,
        "latency_s": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                      "max": max(latencies, default=None),
                      "mean": statistics.mean(latencies) if latencies else None},
        "server_seconds_mean": statistics.mean(server_s) if server_s else None,
        "warmup_s": warmup_s, "errors": [error for tally in tallies for error in tally.errors][:10],
        "bomb": bomb_answer, "server_peak_memory_gb": None if peak_memory is None else peak_memory / 2**30,
        "server": {"precision": info.get("precision"), "device": info.get("device")},
        "machine": machine,
    }


def run_serve(args: argparse.Namespace) -> dict:
    """The serve load check with the command line's settings, in a fresh temporary folder (removed after a
    check that ran; kept, with the server's log, after one that could not)."""
    work = Path(tempfile.mkdtemp(prefix="btcv_bench_serve_"))
    log = print if not args.silent else (lambda *a, **k: None)
    checkpoint = args.serve_checkpoint.resolve() if args.serve_checkpoint else None
    results = serve_load(work, args.clients, args.serve_seconds, args.serve_sizes, args.device, checkpoint, log=log)
    shutil.rmtree(work, ignore_errors=True)  # phantoms and job folders: the figures are all that is kept
    return results


def serve_table(r: dict) -> str:
    m, latency = r["machine"], r["latency_s"]

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    shapes = ", ".join("x".join(map(str, shape)) for shape in r["scan_shapes"])
    rows = [("jobs completed", str(r["completed"])), ("jobs failed", str(r["failed"])),
            ("queue full (503), retried", str(r["refused_503"])), ("jobs per minute", f"{r['jobs_per_minute']:.1f}"),
            ("latency p50, s", seconds(latency["p50"])), ("latency p95, s", seconds(latency["p95"])),
            ("latency max, s", seconds(latency["max"])),
            ("server seconds per job (mean)", seconds(r["server_seconds_mean"])),
            ("server peak memory, GB", "-" if r["server_peak_memory_gb"] is None else f"{r['server_peak_memory_gb']:.2f}")]
    lines = [f"serve load check: {r['clients']} clients submitting for {r['serve_seconds']:g} s "
             f"({r['elapsed_s']:.0f} s until their last jobs were done); {r['checkpoint']}; scans {shapes}"]
    lines += [f"{name:32s} {value:>8s}" for name, value in rows]
    lines += [
        "latency: from POST /jobs to the mask downloaded, polling the job every "
        f"{SERVE_POLL_S:g} s (warm-up job before the clock: {r['warmup_s']:.2f} s)",
        f"machine: {m['gpu'] or m['model']}, {m['threads']} threads, torch {m['torch']} ({m['capability']} kernels), "
        f"server on {r['server']['device']}",
        f"precision {m['precision']['name']}: {m['precision']['reason']}",
    ]
    if r["bomb"]:
        b = r["bomb"]
        lines.append(f"bomb: {b['bytes'] / 2**20:.1f} MB declaring {' x '.join(map(str, BOMB_SHAPE))} voxels, sent "
                     f"halfway: answered in {b['answer_s']:.2f} s: {b['detail']}")
    lines += [f"error: {error}" for error in r["errors"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes: a smoke run of a few minutes")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default runs/bench_<device>[_quick].json)")
    parser.add_argument("--silent", action="store_true", help="print only the table")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per figure after the warm-up (default 3, --quick 2)")
    parser.add_argument("--switches", action="store_true",
                        help="only measure each fast-path switch against its alternative on this machine")
    parser.add_argument("--dice_checkpoint", type=Path, default=None,
                        help="trained checkpoint for the Dice check (e.g. runs/demo/model.pt) instead of a tiny model "
                             "trained here; needs --dice_data")
    parser.add_argument("--dice_data", type=Path, default=None,
                        help="dataset folder with dataset.json whose validation cases the Dice check segments")
    parser.add_argument("--serve", action="store_true",
                        help="only the load check of btcv-unetr serve: clients submitting phantoms for a bounded time")
    parser.add_argument("--clients", type=int, default=4, help="--serve: clients submitting jobs at once")
    parser.add_argument("--serve_seconds", type=float, default=60.0,
                        help="--serve: seconds the clients submit for (then their last jobs are awaited)")
    parser.add_argument("--serve_checkpoint", type=Path, default=None,
                        help="--serve: the model the server loads (default: a tiny model with random weights)")
    parser.add_argument("--serve_size", default="64",
                        help="--serve: phantom sizes in-plane, voxels, comma-separated and taken in turn (512: BTCV's "
                             "512 x 512 x ~100-200)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    if (args.dice_checkpoint is None) != (args.dice_data is None):
        print("error: --dice_checkpoint and --dice_data go together", file=sys.stderr)
        return 2
    if args.serve and args.switches:
        print("error: --serve and --switches are separate runs: choose one", file=sys.stderr)
        return 2
    try:
        args.serve_sizes = tuple(int(size) for size in args.serve_size.split(","))
    except ValueError:
        args.serve_sizes = ()
    if args.clients < 1 or args.serve_seconds <= 0 or not args.serve_sizes or min(args.serve_sizes) < 16:
        print("error: --clients must be >= 1, --serve_seconds > 0, --serve_size sizes >= 16 (e.g. 64,512)",
              file=sys.stderr)
        return 2
    for path in (args.dice_checkpoint, args.dice_data and args.dice_data / "dataset.json", args.serve_checkpoint):
        if path is not None and not path.is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    started = time.perf_counter()
    kind = "serve" if args.serve else "switches" if args.switches else "paths"
    try:
        results = {"serve": run_serve, "switches": run_switches, "paths": run}[kind](args)
    except ServeCheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results["duration_s"] = time.perf_counter() - started
    prefix = "" if kind == "paths" else f"{kind}_"
    suffix = "_quick" if args.quick and not args.serve else ""  # --quick does not change the serve check
    out = args.out or Path("runs") / f"bench_{prefix}{args.device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print({"serve": serve_table, "switches": switch_table, "paths": table}[kind](results))
    print(f"{results['duration_s']:.0f} s in all; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
