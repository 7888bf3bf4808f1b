"""Every automatic decision the package takes by device, on its GPU branch, with a faked CUDA device: the
torch.cuda functions the code calls are replaced, so these run on a CPU-only machine and assert the value a GPU
gets (2D and 3D models alike). tests/test_precision.py covers the automatic precision of a GPU."""

from __future__ import annotations

import argparse
import contextlib

import pytest
import torch
from conftest import tiny_config

from btcv_unetr import distributed
from btcv_unetr.config.load import CONFIG_DIR, build_config, read_yaml
from btcv_unetr.config.schema import Config, FastConfig
from btcv_unetr.distributed import Context, pick_device
from btcv_unetr.errors import UserError
from btcv_unetr.inference import command as infer_command
from btcv_unetr.inference import predictor as predictor_module
from btcv_unetr.inference.predictor import Predictor
from btcv_unetr.inference.sliding_window import auto_sw_batch_size
from btcv_unetr.model.speed import memory_format_for, sdpa_for
from btcv_unetr.runtime.precision import Precision, resolve_precision, runs_natively
from btcv_unetr.testing.checkpoints import seeded_checkpoint
from btcv_unetr.train import command as train_command
from btcv_unetr.train import loop

MiB, GiB = 1 << 20, 1 << 30
GPU, CPU = torch.device("cuda", 0), torch.device("cpu")


def fake_gpu(monkeypatch, free: int = 40 * GiB, capability: tuple[int, int] = (9, 0), count: int = 1) -> list[int]:
    """This process sees ``count`` CUDA devices of compute ``capability`` with ``free`` bytes free; returns the
    devices ``torch.cuda.set_device`` was called with."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Faked GPU")
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def demo2d_config() -> Config:
    """``make demo2d``'s config (configs/shapes2d.yaml): a 2D model, windows per pass left automatic."""
    return build_config([read_yaml(CONFIG_DIR / "shapes2d.yaml")])


# Per window 64 bytes per voxel and feature; half the free memory is used, at most 8 windows, at least 1.
@pytest.mark.parametrize("roi, feature_size, free, expected", [
    ((128, 128), 16, 100 * MiB, 3),  # 2D: 16 MiB a window, 50 MiB to fill
    ((128, 128), 16, 4 * GiB, 8),  # 2D: 128 would fit, the limit is 8
    ((96, 96, 96), 16, 4 * GiB, 2),  # UNETR-B: 864 MiB a window, 2 GiB to fill
    ((96, 96, 96), 16, 1 * GiB, 1),  # none fits in half: still one
    ((32, 32, 32), 8, 100 * MiB, 3),  # the tests' tiny model: 16 MiB a window
])
def test_windows_per_pass_on_a_gpu_fill_half_the_free_memory(monkeypatch, roi, feature_size, free, expected):
    fake_gpu(monkeypatch, free=free)
    assert auto_sw_batch_size(0, GPU, roi, feature_size, "bf16") == expected
    assert auto_sw_batch_size(0, GPU, list(roi), feature_size, "bf16") == expected  # any sequence of sizes
    assert auto_sw_batch_size(5, GPU, roi, feature_size, "bf16") == 5  # asked for: kept


def test_make_demo2d_chooses_its_windows_per_pass_on_a_gpu(monkeypatch):
    """The demo's config leaves sw_batch_size automatic: its 2D ROI has two sizes (an IndexError before)."""
    fake_gpu(monkeypatch, free=100 * MiB)
    config = demo2d_config()
    assert config.infer.sw_batch_size == 0 and config.model.roi_size == (128, 128)
    assert auto_sw_batch_size(0, GPU, config.model.roi_size, config.model.feature_size, "bf16") == 3


def test_validation_on_a_gpu_runs_a_2d_model(monkeypatch):
    """Training's validation on a GPU with the 2D demo's automatic windows per pass (the crash of ``make demo2d``
    on a GPU): the windows per pass it passes to the sliding window are those that fit."""
    fake_gpu(monkeypatch, free=100 * MiB)
    config = demo2d_config()
    passed = []

    def sliding_window(image, sw_batch_size, predictor, **settings):
        passed.append((sw_batch_size, settings["roi_size"]))
        return torch.zeros(1, config.model.out_channels, *image.shape[2:])

    monkeypatch.setattr(loop, "sliding_window_inference", sliding_window)
    monkeypatch.setattr(loop, "plain", lambda tensor, device: tensor)  # no GPU to copy to
    batch = {"image": torch.rand(1, 3, 40, 48), "label": torch.zeros(1, 1, 40, 48)}
    result = loop.validate(torch.nn.Identity(), [batch], config, Precision("fp32", "test", "cuda"),
                           Context(0, 1, 0, GPU))
    assert passed == [(3, (128, 128))] and result.cases == 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Our tiny 3D and 2D models as training writes them (seeded random weights)."""
    folder = tmp_path_factory.mktemp("gpu_decisions")
    return {3: seeded_checkpoint(folder / "tiny3d" / "model.pt", tiny_config()),
            2: seeded_checkpoint(folder / "tiny2d" / "model.pt",
                                 build_config([read_yaml(CONFIG_DIR / "tiny2d.yaml")]))}


def gpu_predictor(monkeypatch, path, spatial_dims: int) -> Predictor:
    """A :class:`Predictor` for ``--device cuda`` whose decisions are a GPU's; the weights stay on the CPU."""
    load_members = predictor_module.load_members
    monkeypatch.setattr(predictor_module, "load_members", lambda config, device: load_members(config, CPU))
    base = tiny_config() if spatial_dims == 3 else build_config([read_yaml(CONFIG_DIR / "tiny2d.yaml")])
    config = build_config([base.to_dict(), {"train": {"pretrained_dir": str(path.parent),
                                                      "pretrained_model_name": path.name},
                                            "infer": {"device": "cuda", "sw_batch_size": 0}}])
    return Predictor(config)



@pytest.mark.parametrize("spatial_dims, capability, precision", [(3, (9, 0), "bf16"), (2, (9, 0), "bf16"),
                                                                 (2, (7, 5), "fp16")])
def test_the_predictor_on_a_gpu(monkeypatch, checkpoints, spatial_dims, capability, precision):
    """Windows per pass from free memory (tiny windows: 16 MiB in 3D, 2 MiB in 2D, 50 MiB to fill), the GPU's
    precision, the fused attention, the default memory layout, and the GPU's name in each mask's provenance."""
    fake_gpu(monkeypatch, free=100 * MiB, capability=capability)
    predictor = gpu_predictor(monkeypatch, checkpoints[spatial_dims], spatial_dims)
    assert predictor.device == torch.device("cuda")  # --device cuda: the current GPU
    assert predictor.sw_batch_size == (3 if spatial_dims == 3 else 8)
    assert predictor.precision.name == precision and predictor.precision.device_type == "cuda"
    assert predictor.memory_format == torch.contiguous_format
    attention = [m for m in predictor.models[0].modules() if hasattr(m, "use_flash_attention")]
    assert attention and all(m.use_flash_attention for m in attention)
    made_with = predictor.provenance()
    assert made_with["device"] == "cuda" and made_with["device_name"] == "Faked GPU"


@pytest.mark.parametrize("shape, free, blended_on", [
    ((1, 64, 64, 64), 200 * MiB, "cuda"),  # 14 classes x 262k voxels x 8 bytes = 28 MiB: under a quarter of 200
    ((1, 64, 64, 64), 100 * MiB, "cpu"),  # over a quarter of 100 MiB
])
def test_windows_are_blended_on_the_gpu_where_the_class_map_fits(monkeypatch, checkpoints, shape, free, blended_on):
    fake_gpu(monkeypatch, free=100 * MiB)
    predictor = gpu_predictor(monkeypatch, checkpoints[3], 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GiB))
    assert predictor._stitch_device(torch.zeros(shape)).type == blended_on


def test_a_2d_picture_is_blended_on_the_gpu(monkeypatch, checkpoints):
    fake_gpu(monkeypatch, free=100 * MiB)
    predictor = gpu_predictor(monkeypatch, checkpoints[2], 2)
    assert predictor._stitch_device(torch.zeros(3, 512, 512)).type == "cuda"  # 3 classes x 786k pixels x 8: 18 MiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * MiB, 80 * GiB))
    assert predictor._stitch_device(torch.zeros(3, 512, 512)).type == "cpu"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_attention_and_memory_layout_on_a_gpu(precision, spatial_dims):
    """The fused attention (flash kernels) in every precision, and never channels-last (not measured on GPUs)."""
    assert sdpa_for(FastConfig(), GPU, precision)
    assert not sdpa_for(FastConfig(sdpa=False), GPU, precision)  # asked for: kept
    for training in (True, False):
        assert memory_format_for(FastConfig(), GPU, precision, training, spatial_dims) == torch.contiguous_format


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_gpu_takes_the_whole_batch_in_one_pass(precision):
    assert loop.micro_batch_size(FastConfig(), GPU, 8, precision) == 8
    assert loop.micro_batch_size(FastConfig(micro_batch=2), GPU, 8, precision) == 2


@pytest.mark.parametrize("capability, natively", [((7, 5), {"fp32", "fp16"}), ((8, 0), {"fp32", "fp16", "bf16"})])
def test_precisions_that_run_natively_on_a_gpu(monkeypatch, capsys, capability, natively):
    fake_gpu(monkeypatch, capability=capability)
    assert {name for name in ("fp32", "bf16", "fp16") if runs_natively(name, GPU)} == natively
    chosen = resolve_precision("bf16", GPU, tiny_config().model)
    assert chosen.name == "bf16" and chosen.device_type == "cuda"
    warned = "warning: precision bf16 has no fast kernels on this GPU" in capsys.readouterr().err
    assert warned == ("bf16" not in natively)


def test_float16_on_a_gpu_scales_its_gradients(monkeypatch):
    fake_gpu(monkeypatch, capability=(7, 5))
    assert Precision("fp16", "test", "cuda").scaler.is_enabled()
    assert not Precision("bf16", "test", "cuda").scaler.is_enabled()


@pytest.mark.parametrize("capability, name", [((8, 0), "bf16"), ((7, 5), "fp16")])
def test_training_resolves_the_gpus_precision(monkeypatch, capability, name):
    fake_gpu(monkeypatch, capability=capability)
    chosen = loop.run_precision(tiny_config(), Context(0, 1, 0, GPU))
    assert chosen.name == name and chosen.device_type == "cuda"


def test_the_device_flag_takes_a_visible_gpu(monkeypatch):
    fake_gpu(monkeypatch)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cuda") == torch.device("cuda")
    assert pick_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == CPU
    with pytest.raises(UserError, match="no CUDA device is visible"):
        pick_device("cuda")


@pytest.mark.parametrize("nproc_per_node, expected", [(None, 4), (2, 2)])
def test_distributed_spawns_one_process_per_visible_gpu(monkeypatch, nproc_per_node, expected):
    fake_gpu(monkeypatch, count=4)
    spawned = []
    monkeypatch.setattr(distributed.mp, "spawn", lambda fn, args, nprocs, join: spawned.append(nprocs))
    monkeypatch.delenv("RANK", raising=False)
    config = tiny_config(dist={"distributed": True, "nproc_per_node": nproc_per_node}, infer={"device": "auto"})
    distributed.launch(lambda context, config: None, config)
    assert spawned == [expected]


def test_each_process_takes_its_own_gpu_and_the_gpu_backend(monkeypatch):
    chosen = fake_gpu(monkeypatch, count=2)
    backends = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kwargs: backends.append(backend))
    monkeypatch.delenv("RANK", raising=False)
    context = distributed.setup(1, tiny_config(infer={"device": "auto"}), nprocs=2)
    assert context.device == torch.device("cuda", 1) and chosen == [1] and backends == ["nccl"]


def test_training_loaders_pin_memory_on_a_gpu(monkeypatch):
    monkeypatch.setattr(loop, "load_config_split", lambda data, split: [{"image": "a.nii.gz", "label": "b.nii.gz"}])
    monkeypatch.setattr(loop, "make_dataset", lambda items, transform, data: list(items))
    for device, pinned in ((GPU, True), (CPU, False)):
        train, validation, _ = loop.build_loaders(tiny_config(), Context(0, 1, 0, device))
        assert train.pin_memory is pinned and validation.pin_memory is pinned


def test_inference_on_a_gpu_keeps_the_cpu_threads_and_glibcs_allocator(monkeypatch):
    """The CPU's share of threads per rank and the allocator switch are CPU decisions: a GPU run takes neither."""
    calls = []
    monkeypatch.setattr(infer_command, "run_inference", lambda config, context=None: calls.append("run"))
    monkeypatch.setattr(infer_command, "share_cpu_threads", lambda processes: calls.append("threads"))
    monkeypatch.setattr(infer_command, "keep_freed_memory", lambda: calls.append("allocator"))
    monkeypatch.delenv("RANK", raising=False)
    fake_gpu(monkeypatch)
    assert infer_command.run(argparse.Namespace(device="auto")) == 0
    infer_command.infer_worker(Context(0, 1, 0, GPU), tiny_config())
    assert calls == ["run", "run"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a CPU-only machine
    assert infer_command.run(argparse.Namespace(device="auto")) == 0
    infer_command.infer_worker(Context(0, 1, 0, CPU), tiny_config())
    assert calls == ["run", "run", "allocator", "run", "threads", "run"]


def test_training_on_a_gpu_keeps_glibcs_allocator(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(train_command, "keep_freed_memory", lambda: calls.append("allocator"))
    monkeypatch.setattr(train_command, "set_determinism", lambda seed: None)
    monkeypatch.setattr(train_command, "check_training_data", lambda config, context: None)
    monkeypatch.setattr(train_command, "resolve_logdir", lambda logdir: tmp_path)
    monkeypatch.setattr(train_command, "run_folder", lambda logdir, config, context: contextlib.nullcontext())
    monkeypatch.setattr(train_command, "run_training", lambda context, config, logdir: calls.append("train"))
    for device in (GPU, CPU):
        train_command.train_worker(Context(0, 1, 0, device), tiny_config())
    assert calls == ["train", "allocator", "train"]

