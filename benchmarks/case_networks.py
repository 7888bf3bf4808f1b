"""``--networks``: each network of the registry on one window, MONAI's plain float32 module against this project's
fast path, and each speed switch's alternative, on the machine at hand.

Per network (the BTCV recipe's settings, configs/btcv_NAME.yaml, at 96^3; ``--quick``: the phantom demo's,
configs/phantom_demo[_NAME].yaml): parameters, FLOPs per window, forward (inference mode) and training step
(forward and backward, deep heads included) per window
    plain      MONAI's module as built, float32, contiguous layout, its own attention
    fast       as test.py and main.py run it here: the precision chosen for this machine, the layout and attention
               this project decides for the network
    and the fast path with channels-last layout turned the other way, and with fused attention (SDPA) the other
    way where the network has attention, so that each decision is measured on this machine.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from machine import machine_facts, median_seconds, run_precision

from btcv_unetr.config.load import CONFIG_DIR, build_config, read_yaml
from btcv_unetr.config.schema import ARCHITECTURE_NAMES, Config
from btcv_unetr.model.architectures import deep_outputs
from btcv_unetr.model.build import build_model, model_size
from btcv_unetr.model.speed import prepare_model, use_sdpa


def network_config(name: str, quick: bool) -> Config:
    """The recipe of ``name``: configs/btcv_NAME.yaml, or with ``quick`` the demo's (phantom_demo[_NAME].yaml)."""
    if quick:
        return build_config([read_yaml(CONFIG_DIR / ("phantom_demo.yaml" if name == "unetr"
                                                     else f"phantom_demo_{name}.yaml"))])
    return build_config([read_yaml(CONFIG_DIR / f"btcv_{name}.yaml")])


def _passes(model: torch.nn.Module, config: Config, device: torch.device, precision, layout, repeats: int) -> dict:
    """Forward (inference mode, eval) and training step (train mode, every head in the loss) of one window."""
    x = torch.randn(1, config.model.in_channels, *config.model.roi_size, device=device)
    x = x.contiguous(memory_format=layout)
    spatial_dims = config.model.spatial_dims

    def forward():
        model.eval()
        with torch.inference_mode(), precision.autocast(device):
            return model(x)

    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        with precision.autocast(device):
            heads = deep_outputs(model(x), spatial_dims)
        sum(head.float().square().mean() for head in heads).backward()

    return {"forward_s": median_seconds(forward, repeats), "train_step_s": median_seconds(step, repeats)}


def _variant(base: torch.nn.Module, config: Config, device: torch.device, precision, training: bool,
             fast) -> tuple[torch.nn.Module, torch.memory_format]:
    return prepare_model(copy.deepcopy(base), fast, device, precision.name, training=training,
                         model_name=config.model.model_name)


def measure_network(name: str, device: torch.device, quick: bool, repeats: int) -> dict:
    config = network_config(name, quick)
    torch.manual_seed(0)
    base = build_model(config.model, config.data.pixdim).to(device)
    parameters, flops = model_size(config.model, config.data.pixdim)
    fp32 = run_precision(dataclasses.replace(config, train=dataclasses.replace(config.train, precision="fp32")),
                         device)
    precision = run_precision(config, device)
    row = {"network": name, "roi": list(config.model.roi_size), "parameters": parameters, "gflops": flops / 1e9,
           "precision": precision.name}
    plain = copy.deepcopy(base)
    row["plain"] = _passes(plain, config, device, fp32, torch.contiguous_format, repeats)
    fast = {}
    for training in (False, True):
        model, layout = _variant(base, config, device, precision, training, config.fast)
        fast["train_step_s" if training else "forward_s"] = \
            _passes(model, config, device, precision, layout, repeats)["train_step_s" if training else "forward_s"]
        fast["layout_" + ("training" if training else "inference")] = \
            "channels-last" if layout == torch.channels_last_3d else "contiguous"
        # the other layout: was the decision right on this machine?
        other = dataclasses.replace(config.fast, channels_last=layout != torch.channels_last_3d)
        model, other_layout = _variant(base, config, device, precision, training, other)
        fast[("train_step_s" if training else "forward_s") + "_other_layout"] = \
            _passes(model, config, device, precision, other_layout, repeats)["train_step_s" if training
                                                                            else "forward_s"]
    row["fast"] = fast
    model, layout = _variant(base, config, device, precision, False, config.fast)
    attention = use_sdpa(model, True)
    if attention:
        with_sdpa = _passes(model, config, device, precision, layout, repeats)["forward_s"]
        use_sdpa(model, False)
        row["attention"] = {"sdpa_forward_s": with_sdpa,
                            "own_forward_s": _passes(model, config, device, precision, layout, repeats)["forward_s"]}
    return row


def run_networks(args) -> dict:
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 3)
    names = args.networks.split(",") if isinstance(args.networks, str) else list(ARCHITECTURE_NAMES)
    rows = []
    for name in names:
        rows.append(measure_network(name, device, args.quick, repeats))
        if not args.silent:
            print(network_table({"rows": rows[-1:]}).splitlines()[-1], flush=True)
    config = network_config("unetr", args.quick)
    return {"machine": machine_facts(device, run_precision(config, device)), "quick": args.quick,
            "repeats": repeats, "rows": rows}


def network_table(results: dict) -> str:
    """One line per network: size, plain and fast forward and training step, the other layout's times."""
    lines = ["network     params  GFLOPs  fwd plain  fwd fast (other layout)  step plain  step fast (other layout)"
             "  attention sdpa/own"]
    for row in results["rows"]:
        fast, plain = row["fast"], row["plain"]
        attention = row.get("attention")
        sdpa = f"{attention['sdpa_forward_s']:.2f}/{attention['own_forward_s']:.2f} s" if attention else "-"
        lines.append(f"{row['network']:<11} {row['parameters'] / 1e6:5.1f}M {row['gflops']:7.1f}  "
                     f"{plain['forward_s']:7.2f} s  {fast['forward_s']:6.2f} s ({fast['forward_s_other_layout']:.2f})"
                     f"         {plain['train_step_s']:7.2f} s  {fast['train_step_s']:6.2f} s "
                     f"({fast['train_step_s_other_layout']:.2f})          {sdpa}")
    return "\n".join(lines)
