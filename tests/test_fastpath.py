"""The fast path equals the reference-style path within tolerance, and each switch can be turned off."""

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from monai.losses import DiceCELoss
from monai.transforms import ResizeWithPadOrCropd

from btcv_unetr import cli
from btcv_unetr.config.flags import parse_config
from btcv_unetr.config.schema import FastConfig
from btcv_unetr.data.transforms import infer_transforms, val_transforms
from btcv_unetr.distributed import Context
from btcv_unetr.inference import sliding_window
from btcv_unetr.inference.inversion import class_map, probabilities_to_scan
from btcv_unetr.inference.predictor import Predictor
from btcv_unetr.inference.sliding_window import auto_sw_batch_size
from btcv_unetr.model.build import build_model
from btcv_unetr.model.speed import (
    ChannelsLastInstanceNorm3d,
    channels_last_norms,
    memory_format_for,
    sdpa_for,
    to_memory_format,
    use_sdpa,
)
from btcv_unetr.runtime.precision import CpuFeatures, Precision
from btcv_unetr.synthetic.phantoms import generate_case
from btcv_unetr.testing.reference import InverseTransformPredictor, reference_style  # the oracle
from btcv_unetr.train.loop import micro_batch_size, train_step
from btcv_unetr.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


# The tests that share the trained model stay in one process, which trains it once.
TRAINED = pytest.mark.xdist_group("test_fastpath")


# Session scope: pytest-xdist may run another file's test between two of the group's, and a module fixture is then
# torn down and fitted again (20-30 s); the tests copy the model before changing it.
@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny UNETR fitted for 40 steps to the middle 32^3 window of one phantom as the tiny config preprocesses it
    (6 mm, windowed): confident logits on the phantoms these tests segment, as a trained model has, and masks of
    several organs. Untrained weights would not do: their near-tied logits flip under bf16 (0.8% of the voxels of
    test_fast_windows_match_the_reference_path, where 0.1% is allowed); these flip 0.03%."""
    torch.manual_seed(0)
    config = tiny_config()
    folder = tmp_path_factory.mktemp("trained")
    case = generate_case(seed=5, index=1, size=64)
    nib.save(case.image, folder / "image.nii.gz")
    nib.save(case.label, folder / "label.nii.gz")
    scan = val_transforms(config)({"image": str(folder / "image.nii.gz"), "label": str(folder / "label.nii.gz")})
    window = ResizeWithPadOrCropd(keys=["image", "label"], spatial_size=config.model.roi_size)(scan)
    image, label = window["image"].as_tensor()[None], window["label"].as_tensor()[None]
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(40):
        optimizer.zero_grad()
        loss_fn(model(image), label).backward()
        optimizer.step()
    torch.save(model.state_dict(), folder / "w.pth")
    return model.eval(), image, folder


@TRAINED
def test_sdpa_gives_the_same_output(trained):
    model, image, _ = trained
    model = copy.deepcopy(model)
    with torch.no_grad():
        use_sdpa(model, False)
        plain = model(image)
        assert use_sdpa(model, True) == 12  # UNETR always has 12 ViT layers
        fused = model(image)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("affine", [False, True])
def test_channels_last_instance_norm_equals_instance_norm(affine):
    torch.manual_seed(0)
    plain = torch.nn.InstanceNorm3d(6, affine=affine)
    if affine:
        torch.nn.init.normal_(plain.weight)
        torch.nn.init.normal_(plain.bias)
    x = (torch.randn(3, 6, 9, 10, 11) * 4 + 7).contiguous(memory_format=torch.channels_last_3d)
    fast = copy.deepcopy(plain)
    assert channels_last_norms(fast) == 1 and type(fast) is ChannelsLastInstanceNorm3d
    out = fast(x)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)  # no reorder for the next convolution
    torch.testing.assert_close(out, plain(x), atol=1e-5, rtol=1e-5)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert channels_last_norms(fast, enabled=False) == 1 and type(fast) is torch.nn.InstanceNorm3d


@pytest.mark.parametrize("channels_last, device, precision, training, expected", [
    (None, "cpu", "fp32", False, True), (None, "cpu", "bf16", False, True),  # inference: always on the CPU
    (None, "cpu", "fp32", True, True), (None, "cpu", "bf16", True, False),   # training: only in float32
    (None, "cuda", "fp32", False, False), (True, "cuda", "fp32", False, False),
    (True, "cpu", "bf16", True, True), (False, "cpu", "fp32", False, False),
])
def test_memory_format_per_stage_and_precision(channels_last, device, precision, training, expected):
    layout = memory_format_for(FastConfig(channels_last=channels_last), torch.device(device), precision,
                                        training)
    assert layout == (torch.channels_last_3d if expected else torch.contiguous_format)


@pytest.mark.parametrize("sdpa, device, precision, expected", [
    (None, "cpu", "fp32", True), (None, "cpu", "bf16", False), (None, "cuda", "bf16", True),
    (None, "cuda", "fp16", True), (True, "cpu", "bf16", True), (False, "cuda", "fp16", False),
])
def test_attention_kernel_per_class(sdpa, device, precision, expected):
    assert sdpa_for(FastConfig(sdpa=sdpa), torch.device(device), precision) is expected


@TRAINED
def test_channels_last_layout_swaps_the_norms(trained):
    model = copy.deepcopy(trained[0])
    norms = sum(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules())
    assert to_memory_format(model, torch.contiguous_format) is model
    assert not any(isinstance(m, ChannelsLastInstanceNorm3d) for m in model.modules())
    to_memory_format(model, torch.channels_last_3d)
    assert sum(isinstance(m, ChannelsLastInstanceNorm3d) for m in model.modules()) == norms > 0
    assert model.out.conv.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)


@TRAINED
def test_fast_windows_match_the_reference_path(trained, tmp_path):
    """This machine's precision + SDPA + allocator switch vs float32 on one image: logits close, argmax agrees on > 99.9%."""
    _, _, folder = trained
    scan = tmp_path / "scan.nii.gz"
    nib.save(generate_case(seed=5, index=2, size=48).image, scan)
    fast = tiny_config(train={"pretrained_dir": str(folder), "pretrained_model_name": "w.pth"},
                       infer={"sw_batch_size": 1})
    reference = reference_style(fast)
    image = Predictor(reference).transform({"image": str(scan)})["image"]
    probabilities = {name: Predictor(config).probabilities(image)
                     for name, config in (("reference", reference), ("fast", fast))}
    ref, fast_p = probabilities["reference"], probabilities["fast"]
    assert ref.shape == fast_p.shape and ref.shape[0] == 14
    assert (ref.argmax(0) == fast_p.argmax(0)).float().mean() > 0.999
    assert (ref - fast_p).abs().max() < 0.05


@TRAINED
def test_fast_masks_match_the_reference_path_in_the_scan_geometry(trained, tmp_path):
    """The whole fast path (crop before resampling, one-step inversion, ...) vs the reference-style one."""
    _, _, folder = trained
    scan = tmp_path / "scan.nii.gz"
    nib.save(generate_case(seed=5, index=2, size=96).image, scan)
    # Crop first asked for: a bare state dict (w.pth) is otherwise run with the reference's order (loader.py).
    fast = tiny_config(train={"pretrained_dir": str(folder), "pretrained_model_name": "w.pth"},
                       data={"crop_before_resampling": True})
    masks = {"reference": InverseTransformPredictor(reference_style(fast)).segment(scan)[0],
             "fast": Predictor(fast).segment(scan)[0]}
    assert masks["fast"].shape == masks["reference"].shape == nib.load(scan).shape
    organs = masks["reference"] > 0
    assert organs.sum() > 1000  # the check means something only if the model finds organs
    assert (masks["fast"] == masks["reference"]).mean() > 0.99
    # The test model works at 6 mm: a one-voxel boundary shift (the crop-first sub-voxel grid shift, bf16)
    # is a large share of each organ here. A flipped or misplaced mask scores < 0.2.
    assert (masks["fast"][organs] == masks["reference"][organs]).mean() > 0.7


def test_crop_before_resampling_keeps_the_box_within_a_voxel(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    nib.save(generate_case(seed=5, index=4, size=96).image, scan)
    fast = tiny_config(data={"space_x": 2.0, "space_y": 2.0, "space_z": 3.0})
    images = {name: infer_transforms(config)({"image": str(scan)})["image"]
              for name, config in (("reference", reference_style(fast)), ("fast", fast))}
    ref, crop_first = images["reference"], images["fast"]
    assert np.abs(np.array(ref.shape) - np.array(crop_first.shape)).max() <= 1
    corner_shift = np.abs(np.asarray(ref.affine)[:3, 3] - np.asarray(crop_first.affine)[:3, 3])
    assert (corner_shift <= np.array([2.0, 2.0, 3.0])).all()
    assert torch.equal(torch.as_tensor(ref.affine)[:3, :3], torch.as_tensor(crop_first.affine)[:3, :3])
    assert 0.0 <= float(crop_first.min()) and float(crop_first.max()) <= 1.0


def test_micro_batches_give_the_gradient_of_the_whole_batch(tiny):
    """The recipe's 4 crops one at a time (accumulated) == one batch of 4: same effective batch, same gradient."""
    torch.manual_seed(0)
    model = build_model(tiny.model)
    image = torch.rand(4, 1, 32, 32, 32)
    label = torch.randint(0, 14, (4, 1, 32, 32, 32)).float()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)
    precision = Precision("fp32", "test")
    context = Context(0, 1, 0, CPU)
    grads, losses = {}, {}
    for micro in (4, 1, 3):
        copy_ = copy.deepcopy(model)
        optimizer = torch.optim.SGD(copy_.parameters(), lr=0.0)
        losses[micro] = train_step(copy_, image, label, loss_fn, optimizer, precision, context, micro)
        grads[micro] = [p.grad.clone() for p in copy_.parameters() if p.grad is not None]
    for micro in (1, 3):
        assert losses[micro] == pytest.approx(losses[4], rel=1e-5)
        assert len(grads[micro]) == len(grads[4])
        for a, b in zip(grads[micro], grads[4]):
            # float32 summation order only: on AVX2 kernels single elements of a small gradient move by up to
            # 0.3% of its largest (3e-5 seen); a micro-batch weighted wrongly (e.g. not by its share of the
            # crops) moves the whole tensor by tens of percent.
            assert float((a - b).norm()) <= 1e-2 * float(b.norm()) + 1e-9


def test_fused_optimizer_takes_the_same_step(tiny):
    torch.manual_seed(0)
    model = build_model(tiny.model)
    x = torch.rand(1, 1, 32, 32, 32)
    results = []
    for fused in (False, True):
        copy_ = copy.deepcopy(model)
        optimizer = build_optimizer(copy_, tiny.train, fused=fused)
        copy_(x).square().mean().backward()
        optimizer.step()
        results.append([p.detach().clone() for p in copy_.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@TRAINED
def test_one_pass_inversion_equals_monai_inverse_transforms(trained, tmp_path):
    """Separable trilinear resampling over the covered box == MONAI's per-channel inverse chain, voxel for
    voxel, for the class map and for the probabilities ``--save_probabilities`` writes."""
    _, _, folder = trained
    scan = tmp_path / "scan.nii.gz"
    nib.save(generate_case(seed=5, index=3, size=96).image, scan)  # stored in a non-RAS orientation
    assert nib.aff2axcodes(nib.load(scan).affine) != ("R", "A", "S")
    for crop_first in (True, False):
        oracle = InverseTransformPredictor(tiny_config(
            train={"pretrained_dir": str(folder), "pretrained_model_name": "w.pth"},
            data={"crop_before_resampling": crop_first}))
        image = oracle.prepare(scan)
        probabilities = oracle.probabilities(image)
        ours, our_probabilities = probabilities_to_scan(probabilities, image, keep_probabilities=True)
        theirs, their_probabilities = oracle.to_scan(probabilities, image, keep_probabilities=True)
        assert ours.shape == theirs.shape == nib.load(scan).shape
        assert our_probabilities.shape == their_probabilities.shape == (14, *ours.shape)
        assert (theirs > 0).sum() > 1000
        assert (ours == theirs).mean() > 0.9999  # only float rounding may flip a tie
        difference = np.abs(our_probabilities.astype(np.float32) - their_probabilities.astype(np.float32))
        assert difference.max() < 1e-3  # float16 rounding: the crop's edges are handled as MONAI does
        assert np.array_equal(probabilities_to_scan(probabilities, image)[0], ours)


@TRAINED
def test_tilted_scans_take_the_one_pass_inversion_too(trained, tmp_path):
    """MONAI's Spacing keeps a tilted scan's direction, so the map stays separable and the masks equal."""
    _, _, folder = trained
    case = generate_case(seed=5, index=3, size=64).image
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(0.2), -np.sin(0.2)], [np.sin(0.2), np.cos(0.2)]]  # a gantry tilt of 11 degrees
    scan = tmp_path / "tilted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(case.dataobj), tilt @ case.affine), scan)
    oracle = InverseTransformPredictor(tiny_config(train={"pretrained_dir": str(folder),
                                                          "pretrained_model_name": "w.pth"}))
    image = oracle.prepare(scan)
    ours, _ = probabilities_to_scan(oracle.probabilities(image), image)
    theirs, _ = oracle.segment(scan)
    assert (ours == theirs).mean() > 0.999 and (theirs > 0).sum() > 100
    rotated = image.clone()
    rotated.affine = torch.as_tensor(tilt) @ image.affine  # a grid rotated against the scan: no preprocessing does that
    with pytest.raises(RuntimeError, match="rotated"):
        probabilities_to_scan(oracle.probabilities(image), rotated)


def test_class_map_equals_argmax_including_ties():
    torch.manual_seed(0)
    scores = torch.randn(14, 9, 8, 7)
    scores[5, 0, 0, 0] = scores[2, 0, 0, 0] = 10.0  # a tie goes to the lower class, as argmax does
    labels = class_map(scores)
    assert labels.dtype == torch.uint8 and labels[0, 0, 0] == 2
    assert torch.equal(labels.long(), scores.argmax(0))


# Run in a fresh process (the allocator's settings are the whole process's): apply the switch as argv[1]
# says, then malloc and free a 64 MiB block, reading glibc's own statistics (mallinfo2) in between; each figure
# is the change since just before the malloc (the imports mapped and allocated some memory of their own).
_HEAP_PROBE = """
import ctypes, json, sys
from btcv_unetr.runtime.allocator import keep_freed_memory
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
applied = [keep_freed_memory(on == "on") for on in sys.argv[1:]]
before = libc.mallinfo2()
block = libc.malloc(64 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped_during": during.hblkhd - before.hblkhd,
                  "heap_during": during.arena - before.arena, "heap_after": after.arena - before.arena,
                  "free_in_heap_after": after.fordblks - before.fordblks}))
"""


def _heap_after_a_64_mib_block(*switches: str) -> dict:
    import ctypes

    from btcv_unetr.runtime.allocator import _glibc
    libc = _glibc()
    if libc is None:
        pytest.skip("the allocator switch tunes glibc's malloc only; this C library is not glibc")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip(f"glibc {ctypes.CDLL(None).gnu_get_libc_version} has no mallinfo2 (2.33 and later)")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _HEAP_PROBE, *switches], cwd=root, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_freed_memory_switch_keeps_large_blocks_in_the_heap():
    """On: a 64 MiB block comes from the heap, not its own mmap, and stays there once freed (no page faults
    when the next activation of that size is allocated)."""
    heap = _heap_after_a_64_mib_block("on")
    assert heap["applied"] == [True]
    assert heap["mmapped_during"] == 0 and heap["heap_during"] >= 64 << 20
    assert heap["heap_after"] >= 64 << 20 and heap["free_in_heap_after"] >= 64 << 20


@pytest.mark.parametrize("switches", [(), ("on", "off")], ids=["glibc_defaults", "on_then_off"])
def test_without_the_switch_large_blocks_are_mapped_and_returned(switches):
    """glibc's defaults (never switched, or switched on and back off): the 64 MiB block is an mmap of its own,
    and the heap holds none of it after the free."""
    heap = _heap_after_a_64_mib_block(*switches)
    assert heap["applied"] == [True] * len(switches)
    assert heap["mmapped_during"] >= 64 << 20
    assert heap["heap_after"] < 64 << 20


def test_automatic_sizes():
    fast = FastConfig()
    assert micro_batch_size(fast, CPU, 4, "bf16") == 1
    assert micro_batch_size(fast, CPU, 4, "fp32") == 2
    assert micro_batch_size(fast, CPU, 1, "fp32") == 1
    assert micro_batch_size(fast, torch.device("cuda"), 4, "bf16") == 4
    assert micro_batch_size(dataclasses.replace(fast, micro_batch=2), CPU, 4, "bf16") == 2
    assert micro_batch_size(dataclasses.replace(fast, micro_batch=8), CPU, 4, "fp32") == 4
    assert auto_sw_batch_size(3, CPU, (96, 96, 96), 16, "bf16") == 3


@pytest.mark.parametrize("amx, precision, windows", [(True, "bf16", 4), (False, "bf16", 2), (True, "fp32", 2),
                                                     (False, "fp32", 2)])
def test_automatic_windows_per_cpu_class(monkeypatch, amx, precision, windows):
    features = CpuFeatures("test CPU", "AVX512", avx512_bf16=True, amx_bf16=amx, arm_bf16=False)
    monkeypatch.setattr(sliding_window, "cpu_features", lambda: features)
    assert auto_sw_batch_size(0, CPU, (96, 96, 96), 16, precision) == windows


def test_reference_style_turns_every_switch_off():
    config = reference_style(parse_config([]))
    assert config.fast == FastConfig(malloc_tuning=False, sdpa=False, micro_batch=4, fused_optimizer=False,
                                     compile=False, channels_last=False)
    assert (config.train.precision, config.infer.sw_batch_size) == ("fp32", 1)
    assert config.data.crop_before_resampling is False  # the reference resamples the whole scan first


def test_flags_turn_each_switch_off():
    config = parse_config(["--no-malloc_tuning", "--no-sdpa", "--micro_batch", "4", "--no-fused_optimizer",
                           "--compile", "--sw_batch_size", "2", "--no-crop_before_resampling",
                           "--no-channels_last"])
    assert config.fast == FastConfig(malloc_tuning=False, sdpa=False, micro_batch=4, fused_optimizer=False,
                                     compile=True, channels_last=False)
    assert config.infer.sw_batch_size == 2 and config.data.crop_before_resampling is False


def test_training_runs_with_every_switch_off(phantom_dir, tmp_path):
    argv = ["train", "--config", "tiny.yaml", "--data_dir", str(phantom_dir), "--json_list", "dataset.json",
            "--logdir", str(tmp_path / "run"), "--max_steps", "2", "--noamp", "--no-sdpa", "--no-malloc_tuning",
            "--micro_batch", "2", "--no-fused_optimizer"]
    assert cli.main(argv) == 0
    assert (tmp_path / "run" / "model_final.pt").is_file()


@pytest.mark.bench  # minutes of CPU: `make bench` runs it, `make test` does not
def test_bench_quick_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--device", "cpu",
                             "--out", str(out), "--silent"], capture_output=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    for path in ("forward_speedup", "train_step_speedup", "inference_speedup"):
        assert data["summary"][path] > 0
    assert abs(data["summary"]["dice_difference"]) < 0.05  # the fast path segments as the reference does
    for name in ("reference", "fast"):
        assert data[name]["inference"]["end_to_end_s"] > data[name]["inference"]["windows_s"] > 0
        assert len(data[name]["loss_curve"]) == data["settings"]["loss_steps"]
    assert data["peak"]["fp32_flops"] > 0 and data["flops"]["forward"] > 0
    assert "forward pass, s" in result.stdout


@pytest.mark.bench  # minutes of CPU: `make bench` runs it, `make test` does not
def test_bench_switches_measures_every_switch_both_ways(tmp_path):
    out = tmp_path / "switches.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--switches", "--quick",
                             "--repeats", "1", "--device", "cpu", "--out", str(out)],
                            capture_output=True, encoding="utf-8", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["machine"]["precision"]["name"] in ("fp32", "bf16") and data["machine"]["capability"]
    measured = {(row["switch"], row["stage"]) for row in data["switches"]}
    assert measured >= {("channels_last", "inference"), ("channels_last", "training"), ("sdpa", "inference"),
                        ("micro_batch", "training"), ("sw_batch_size", "inference"), ("fused_optimizer", "training"),
                        ("compile", "inference"), ("malloc_tuning", "inference"), ("malloc_tuning", "training")}
    assert all(row["chosen_s"] > 0 and row["alternative_s"] > 0 and row["chosen"] != row["alternative"]
               for row in data["switches"])
