"""The default run: the reference-style path against the fast path, one process, every case in turn.

All reference-style figures are taken first, while glibc still has its default allocator, then the
fast-path ones (the allocator switch is process-wide). The table gives each figure for both paths
and their ratio, the fraction of the matmul peak, the Dice and loss-curve gaps, and the forward's
profile by block.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from case_2d import picture_config, picture_figures
from case_infer3d import inference, segment_folder
from case_model import model_passes, module_profile
from case_train3d import data_throughput, loss_curve, tiny_batches, train_tiny, training_step
from machine import count_flops, machine_facts, matmul_peak, memory_bandwidth, run_precision
from settings import BTCV_LIKE_CASE, SETTINGS, TINY

from btcv_unetr.config.load import build_config
from btcv_unetr.config.schema import Config
from btcv_unetr.files import atomic_save_nifti
from btcv_unetr.inference.predictor import Predictor
from btcv_unetr.model.build import build_model
from btcv_unetr.runtime.allocator import keep_freed_memory
from btcv_unetr.synthetic.phantoms import generate_case, write_dataset
from btcv_unetr.testing.reference import InverseTransformPredictor, reference_style


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
    """The default run with the command line's settings, in a fresh temporary folder: both paths' figures,
    the machine's peaks, FLOP counts and the summary (:func:`summarise`)."""
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
        log(f"  inference {out['inference']['end_to_end_s']:.2f} s per scan, "
            f"windows {out['inference']['windows_s']:.2f} s")
        dice_config = build_config([dice_configs[name].to_dict(),
                                    {"infer": {"output_dir": str(work / f"dice_{name}")}}])
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


def summarise(r: dict) -> dict:
    """Ratios of the two paths (reference over fast: above 1 is a speed-up), fractions of the peak, and the
    Dice and loss-curve gaps (the fast path must learn and segment as the reference does)."""
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
    """The default run's record ``r`` as text: one row per figure, both paths and their ratio."""
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
