"""``--switches``: each fast-path switch against its alternative on this machine, everything else as chosen here
(per window for inference, per training step)."""

from __future__ import annotations

import argparse
import dataclasses

import torch
from case_train3d import training_step
from machine import machine_facts, median_seconds, run_precision
from settings import SETTINGS

from btcv_unetr.config.load import build_config
from btcv_unetr.config.schema import Config
from btcv_unetr.inference.sliding_window import auto_sw_batch_size
from btcv_unetr.model.build import build_model
from btcv_unetr.model.speed import compile_if_asked, memory_format_for, prepare_model, sdpa_for
from btcv_unetr.runtime.allocator import keep_freed_memory
from btcv_unetr.train.loop import micro_batch_size


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
        add("channels_last", stage, on_off[layout], base, on_off[not layout],
            measure(variant(channels_last=not layout)))
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
    """The ``--switches`` record ``r`` as text: one row per switch and stage."""
    m = r["machine"]
    lines = [f"machine: {m['gpu'] or m['model']}, {m['capability']} kernels, precision {m['precision']['name']}",
             f"{'switch':16s} {'stage':9s} {'chosen':>14s} {'alternative':>14s} {'alternative/chosen':>19s}"]
    for row in r["switches"]:
        ratio = row["alternative_s"] / row["chosen_s"]
        lines.append(f"{row['switch']:16s} {row['stage']:9s} {row['chosen']:>5s} {row['chosen_s']:7.3f} s "
                     f"{row['alternative']:>5s} {row['alternative_s']:7.3f} s {ratio:18.2f}x")
    return "\n".join(lines)
