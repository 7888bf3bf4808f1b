import pytest
import torch
from conftest import tiny_config

from btcv_unetr.errors import UserError
from btcv_unetr.model.build import build_model
from btcv_unetr.model.torchscript import load_torchscript_weights
from btcv_unetr.model.weights import load_pretrained

LEGACY_EXTRA = ("vit.patch_embedding.cls_token", "encoder2.blocks.0.1.conv3.conv.weight",
                "encoder2.blocks.1.1.conv3.conv.weight", "encoder3.blocks.0.1.conv3.conv.weight")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny_config().model).eval()


@pytest.fixture
def volume():
    return torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))


def _fresh():
    torch.manual_seed(123)  # different weights from the fixture's
    return build_model(tiny_config().model).eval()


def test_output_shape_and_frozen_unused_parameters(model, volume):
    assert model(volume).shape == (1, 14, 32, 32, 32)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) == 2 * 12 and all(".norm_cross_attn." in name for name in frozen)


def test_old_monai_key_layout_loads_with_identical_output(model, volume, tmp_path):
    """The released BTCV weights have 4 keys current UNETR lacks and lack its 24 unused LayerNorm ones."""
    old = {k: v for k, v in model.state_dict().items() if ".norm_cross_attn." not in k}
    old["vit.patch_embedding.cls_token"] = torch.zeros(1, 1, 96)
    for key in LEGACY_EXTRA[1:]:
        old[key] = torch.randn(8, 8, 1, 1, 1)
    torch.save(old, tmp_path / "UNETR_model_best_acc.pth")
    direct, legacy = _fresh(), _fresh()
    direct.load_state_dict(model.state_dict())
    load_pretrained(legacy, tmp_path / "UNETR_model_best_acc.pth")
    with torch.no_grad():
        assert torch.equal(legacy(volume), direct(volume))
        assert torch.equal(legacy(volume), model(volume))


def test_training_checkpoint_and_ddp_prefix_load(model, volume, tmp_path):
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state, "best_acc": 0.5}, tmp_path / "ckpt.pt")
    other = _fresh()
    load_pretrained(other, tmp_path / "ckpt.pt")
    with torch.no_grad():
        assert torch.equal(other(volume), model(volume))


def test_architecture_mismatch_lists_keys_and_loads_nothing(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "w.pth")
    bigger = build_model(tiny_config(model={"feature_size": 16}).model)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(UserError) as error:
        load_pretrained(bigger, tmp_path / "w.pth")
    message = str(error.value)
    assert "weights do not match the model built from the flags" in message
    assert "wrong shape (file vs model): encoder1.layer.conv1.conv.weight (8, 1, 3, 3, 3) vs (16, 1, 3, 3, 3)" in message
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())
    fewer = {k: v for k, v in model.state_dict().items() if not k.startswith("out.")}
    torch.save(fewer, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="2 missing: out.conv.conv.weight, out.conv.conv.bias"):
        load_pretrained(_fresh(), tmp_path / "partial.pth")


class Custom:  # needs arbitrary code to unpickle
    pass


def test_files_needing_code_are_refused(tmp_path):
    torch.save({"state_dict": {}, "extra": Custom()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused to load, the file needs arbitrary code to unpickle"):
        load_pretrained(_fresh(), tmp_path / "evil.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_pretrained(_fresh(), tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_pretrained(_fresh(), tmp_path / "junk.pt")


def test_torchscript_weights_load_into_the_eager_model(model, volume, tmp_path):
    traced = torch.jit.trace(model, volume, check_trace=False)  # the file is the point, not trace's own re-check
    traced.save(str(tmp_path / "UNETR_model_best_acc.pt"))
    other = _fresh()
    load_torchscript_weights(other, tiny_config().model, tmp_path / "UNETR_model_best_acc.pt")
    with torch.no_grad():
        assert torch.equal(other(volume), model(volume))
    with pytest.raises(UserError, match="this is a TorchScript file: use --resume_jit"):
        load_pretrained(_fresh(), tmp_path / "UNETR_model_best_acc.pt")


@pytest.mark.parametrize("preset, parameters", [("lite", None), ("base", 92_802_478), ("large", 311_867_566)])
def test_each_preset_builds_with_its_printed_parameter_count(preset, parameters):
    """lite, base (the paper's ViT-B: about 92.6 M parameters for BTCV) and large (ViT-L, 24 blocks)."""
    from btcv_unetr.config.flags import parse_config
    from btcv_unetr.model.build import describe_model_size, model_size
    config = parse_config(["--preset", preset]).model
    with torch.device("meta"):  # the count needs the modules, not their memory
        model = build_model(config)
    counted = sum(p.numel() for p in model.parameters())
    assert model_size(config)[0] == counted and len(model.vit.blocks) == config.num_layers
    if parameters is not None:
        assert counted == parameters
    described = describe_model_size(config)
    assert described.startswith(f"model: {counted:,} parameters, ")
    assert described.endswith(" GFLOPs per 96x96x96 window")


def test_a_deeper_vit_feeds_the_decoder_from_a_quarter_half_and_three_quarters_of_its_depth():
    from btcv_unetr.model.unetr import DeeperUNETR
    model = build_model(tiny_config(model={"num_layers": 8}).model).eval()
    assert isinstance(model, DeeperUNETR) and len(model.vit.blocks) == 8
    blocks, skips = {}, {}
    for index, block in enumerate(model.vit.blocks):
        block.register_forward_hook(lambda _m, _i, out, index=index: blocks.__setitem__(index, out))
    for name in ("encoder2", "encoder3", "encoder4"):
        getattr(model, name).register_forward_pre_hook(lambda _m, args, name=name: skips.__setitem__(name, args[0]))
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32, 32))
        assert out.shape == (1, 14, 32, 32, 32)
        for name, block in (("encoder2", 2), ("encoder3", 4), ("encoder4", 6)):
            assert torch.equal(skips[name], model.proj_feat(blocks[block]))
