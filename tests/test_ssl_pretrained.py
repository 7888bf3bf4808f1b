"""``--use_ssl_pretrained``: the self-supervised encoders, in their published key layouts (built here from tiny
networks), downloaded from a loopback server or taken from pretrained_dir, loaded strictly into the encoder only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_net_config
from monai.networks.nets import ViTAutoEnc
from test_pretrained import Served

from btcv_unetr.config.load import ConfigError, build_config
from btcv_unetr.errors import UserError
from btcv_unetr.model import pretrained, ssl
from btcv_unetr.model.build import build_model
from btcv_unetr.model.pretrained import resolve_pretrained
from btcv_unetr.model.ssl import SSL_ENCODERS, load_ssl_encoder, ssl_start_conflict

# What model_swinvit.pt holds besides the encoder: the pretraining network's final norm and its SSL heads.
SWIN_HEADS = {"module.norm.weight": (96,), "module.norm.bias": (96,), "module.rotation_head.weight": (4, 96),
              "module.rotation_head.bias": (4,), "module.contrastive_head.weight": (512, 96),
              "module.conv.0.weight": (48, 96, 3, 3, 3)}


def swin_config(tmp_path: Path, **model):
    return tiny_net_config("swin_unetr", model=model, train={"use_ssl_pretrained": True,
                                                              "pretrained_dir": str(tmp_path / "pretrained")})


def unetr_config(tmp_path: Path, **model):
    return tiny_config(model={"pos_embed": "conv", **model},
                       train={"use_ssl_pretrained": True, "pretrained_dir": str(tmp_path / "pretrained")})


def seeded(config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config.model)


@pytest.fixture(scope="module")
def swin_source(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of a seeded tiny Swin UNETR (built once: a Swin UNETR takes a second to build)."""
    return seeded(swin_config(tmp_path_factory.mktemp("unused")), 1).state_dict()


def swinvit_file(source: dict[str, torch.Tensor], path: Path, drop: str | None = None,
                 replace: dict[str, torch.Tensor] | None = None) -> Path:
    """``source``'s encoder in model_swinvit.pt's layout: {"state_dict": {"module.<key without swinViT.>"}}, the MLP
    layers named fc1/fc2, plus the pretraining network's norm and SSL heads; ``drop``: a key (ours) left out;
    ``replace``: tensors (our keys) written instead of the source's."""
    state = {}
    for key, value in {**source, **(replace or {})}.items():
        if key.startswith("swinViT.") and key != drop:
            name = key[len("swinViT."):].replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
            state[f"module.{name}"] = value.clone()
    torch.manual_seed(9)
    state.update({key: torch.randn(shape) for key, shape in SWIN_HEADS.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)
    return path


def vit_autoenc_file(config, path: Path, seed: int = 3, old_monai: bool = False) -> tuple[Path, dict]:
    """The tutorial's ssl_train.ipynb checkpoint of a ViTAutoEnc of ``config``'s ViT sizes: {"epoch", "state_dict",
    "optimizer"}; ``old_monai``: without the norm_cross_attn tensors that MONAI before 1.4 did not write."""
    m = config.model
    torch.manual_seed(seed)
    net = ViTAutoEnc(in_channels=1, img_size=m.roi_size, patch_size=16, proj_type="conv", hidden_size=m.hidden_size,
                     mlp_dim=m.mlp_dim, num_heads=m.num_heads, num_layers=m.num_layers)
    state = {k: v for k, v in net.state_dict().items() if not (old_monai and ".norm_cross_attn." in k)}
    # Adam's state dict as the notebook saves it (an optimiser is not built here: its first use imports for seconds)
    optimizer = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 500, "state_dict": state, "optimizer": optimizer}, path)
    return path, state


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "btcv-unetr" / "weights"


@pytest.fixture
def served(tmp_path):
    server = Served(tmp_path / "served")
    yield server
    server.close()


def publish_swin(monkeypatch, url: str | None, **model) -> None:
    """The Swin row pointed at ``url``, trained with the tiny net's feature size (the messages compare it)."""
    row = dataclasses.replace(SSL_ENCODERS["swin_unetr"], url=url, model={"feature_size": 12, "use_v2": False,
                                                                         **model})
    monkeypatch.setitem(SSL_ENCODERS, "swin_unetr", row)


def test_the_swin_encoder_is_downloaded_once_and_lands_exactly_with_the_decoder_untouched(tmp_path, cache, served,
                                                                                        monkeypatch, swin_source):
    config = swin_config(tmp_path)
    swinvit_file(swin_source, tmp_path / "served" / "model_swinvit.pt")
    publish_swin(monkeypatch, f"{served.url}/model_swinvit.pt")
    model = seeded(config, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = load_ssl_encoder(model, config)
    after, expected = model.state_dict(), swin_source
    encoder = [k for k in after if k.startswith("swinViT.")]
    assert len(encoder) == 126 and all(torch.equal(after[k], expected[k]) for k in encoder)
    decoder = [k for k in after if not k.startswith("swinViT.")]
    assert decoder and all(torch.equal(after[k], before[k]) for k in decoder)
    assert not torch.equal(after["encoder1.layer.conv1.conv.weight"], expected["encoder1.layer.conv1.conv.weight"])
    assert summary == (f"loaded 126 encoder tensors from {cache / 'model_swinvit.pt'}; ignored 6 tensors outside the "
                       "encoder (norm.weight, norm.bias, rotation_head.weight, rotation_head.bias and 2 more); the "
                       "decoder starts from random weights")
    model.load_state_dict(before)
    load_ssl_encoder(model, config)  # the cached file: no second download
    assert served.requests == ["/model_swinvit.pt"]
    assert torch.equal(model.state_dict()[encoder[0]], expected[encoder[0]])


def test_the_file_in_pretrained_dir_is_used_as_the_recipe_reads_it(tmp_path, cache, monkeypatch, swin_source):
    config = swin_config(tmp_path)
    path = swinvit_file(swin_source, tmp_path / "pretrained" / "model_swinvit.pt")
    publish_swin(monkeypatch, "http://127.0.0.1:9/never-asked")
    monkeypatch.setattr(ssl, "fetch", lambda *args: pytest.fail("a file in pretrained_dir is not downloaded"))
    model = seeded(config, 2)
    assert load_ssl_encoder(model, config).startswith(f"loaded 126 encoder tensors from {path};")
    weight = "swinViT.layers3.0.blocks.1.mlp.linear1.weight"  # fc1 in the file
    assert torch.equal(model.state_dict()[weight], swin_source[weight])


def test_the_unetr_vit_encoder_of_the_tutorial_lands_in_vit_and_its_decoder_heads_are_ignored(tmp_path, cache):
    config = unetr_config(tmp_path)
    path, state = vit_autoenc_file(config, tmp_path / "pretrained" / "best_model.pt", old_monai=True)
    model = seeded(config, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = load_ssl_encoder(model, config)
    after = model.state_dict()
    assert all(torch.equal(after[f"vit.{k}"], v) for k, v in state.items() if not k.startswith("conv3d_transpose"))
    # MONAI's unused norm_cross_attn, absent from files of older MONAI, keeps the model's own values
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("vit.") or "norm_cross_attn" in k)
    loaded = sum(1 for k in state if not k.startswith("conv3d_transpose"))
    assert summary == (f"loaded {loaded} encoder tensors from {path}; ignored 4 tensors outside the encoder "
                       "(conv3d_transpose.weight, conv3d_transpose.bias, conv3d_transpose_1.weight, "
                       "conv3d_transpose_1.bias); the decoder starts from random weights")


def test_a_missing_encoder_tensor_is_one_line_naming_it_and_nothing_is_loaded(tmp_path, cache, monkeypatch,
                                                                              swin_source):
    config = swin_config(tmp_path)
    gone = "swinViT.layers2.0.blocks.1.attn.qkv.weight"
    swinvit_file(swin_source, tmp_path / "pretrained" / "model_swinvit.pt", drop=gone)
    publish_swin(monkeypatch, None)
    model = seeded(config, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as raised:
        load_ssl_encoder(model, config)
    message = str(raised.value)
    assert "\n" not in message and f"1 encoder tensors missing from the file: {gone}" in message
    assert message.startswith(f"{tmp_path / 'pretrained' / 'model_swinvit.pt'}: the self-supervised encoder does "
                              "not match the swin_unetr encoder")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_mis_shaped_encoder_names_the_tensor_and_the_flag_it_was_trained_with(tmp_path, cache, monkeypatch,
                                                                                swin_source):
    wider = {"swinViT.patch_embed.proj.weight": torch.zeros(24, 1, 2, 2, 2)}  # as a feature size 24 file has it
    swinvit_file(swin_source, tmp_path / "pretrained" / "model_swinvit.pt", replace=wider)
    publish_swin(monkeypatch, None, feature_size=24)
    config = swin_config(tmp_path)
    with pytest.raises(UserError, match=r"1 of another shape \(file vs model\): patch_embed\.proj\.weight "
                                        r"\(24, 1, 2, 2, 2\) vs swinViT\.patch_embed\.proj\.weight \(12, 1, 2, 2, 2\)"
                                        r": it was trained with --feature_size 24 \(this config: 12\)$"):
        load_ssl_encoder(seeded(config, 2), config)


def test_the_unetr_encoder_needs_the_tutorials_conv_patch_embedding(tmp_path, cache, monkeypatch):
    config = unetr_config(tmp_path)
    vit_autoenc_file(config, tmp_path / "pretrained" / "best_model.pt")
    monkeypatch.setitem(SSL_ENCODERS, "unetr", dataclasses.replace(SSL_ENCODERS["unetr"], model={"pos_embed": "conv"}))
    perceptron = unetr_config(tmp_path, pos_embed="perceptron")
    with pytest.raises(UserError, match=r"2 encoder tensors missing from the file: vit\.patch_embedding\."
                                        r"patch_embeddings\.1\.weight, .*: it was trained with --pos_embed conv "
                                        r"\(this config: perceptron\)$"):
        load_ssl_encoder(build_model(perceptron.model), perceptron)


def test_a_file_of_another_network_is_refused(tmp_path, cache, monkeypatch, swin_source):
    unetr = unetr_config(tmp_path)
    vit_autoenc_file(unetr, tmp_path / "pretrained" / "model_swinvit.pt")  # a UNETR encoder under the Swin name
    publish_swin(monkeypatch, None)
    config = swin_config(tmp_path)
    with pytest.raises(UserError, match=r"model_swinvit\.pt: not a self-supervised encoder for this swin_unetr "
                                        r"network: 0 of its \d+ tensors \(patch_embedding\.position_embeddings, "
                                        r".*\) are among the encoder's 126 \(swinViT\.\*\)$"):
        load_ssl_encoder(seeded(config, 2), config)
    swinvit_file(swin_source, tmp_path / "pretrained" / "best_model.pt")  # a Swin encoder for the UNETR
    # its final norm has the name and shape of the ViT's: 2 tensors in common are not the encoder
    with pytest.raises(UserError, match=r"not a self-supervised encoder for this unetr network: 2 of its \d+ "
                                        r"tensors .* are among the encoder's 161 \(vit\.\*\)$"):
        load_ssl_encoder(seeded(unetr, 2), unetr)


def test_without_a_published_address_one_line_says_how_to_make_the_file(tmp_path, cache):
    config = unetr_config(tmp_path)
    with pytest.raises(UserError) as raised:
        load_ssl_encoder(seeded(config, 2), config)
    message = str(raised.value)
    missing = tmp_path / "pretrained" / "best_model.pt"
    assert "\n" not in message and message.startswith(f"--use_ssl_pretrained: {missing} not found; UNETR's "
                                                      "self-supervised encoder: no address is published for it: run "
                                                      "MONAI tutorials'")
    assert message.endswith(f"put it into --pretrained_dir ({tmp_path / 'pretrained'})")
    assert not cache.exists()  # nothing was fetched


@pytest.mark.parametrize("flags, named", [
    ({"pretrained": "unetr_btcv"}, "--pretrained"),
    ({"checkpoint": "runs/x/model_final.pt"}, "--checkpoint"),
    ({"resume_jit": True}, "--resume_jit"),
    ({"resume_ckpt": True}, "--resume_ckpt"),
])
def test_other_starting_weights_are_refused_in_one_line_before_any_file_is_read(flags, named, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="config key 'use_ssl_pretrained': excludes pretrained, checkpoint, "
                                          "resume_jit and resume_ckpt"):
        build_config([{"train": {"use_ssl_pretrained": True, **flags}}])
    # A config changed after validation (crossval sets a fold's checkpoint) is refused where the encoder is loaded.
    config = build_config([{"train": {"use_ssl_pretrained": True, "pretrained_dir": str(tmp_path)}}])
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **flags))
    expected = f"--use_ssl_pretrained and {named} exclude each other: both set the encoder's starting weights"
    assert ssl_start_conflict(config.train).startswith(expected)
    monkeypatch.setattr(ssl, "ssl_file", lambda *args: pytest.fail("nothing is read for a refused start"))
    with pytest.raises(UserError, match=expected):
        load_ssl_encoder(torch.nn.Linear(1, 1), config)
    assert ssl_start_conflict(dataclasses.replace(config.train, use_ssl_pretrained=False)) is None


def test_pretrained_with_use_ssl_pretrained_is_refused_before_the_download(monkeypatch):
    monkeypatch.setattr(pretrained, "locate", lambda value: pytest.fail("nothing is fetched for a refused command"))
    config = build_config([{"train": {"pretrained": "unetr_btcv"}}])
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, use_ssl_pretrained=True))
    with pytest.raises(UserError, match="--use_ssl_pretrained and --pretrained exclude each other"):
        resolve_pretrained(config, "train")


def test_the_table_names_the_published_encoders():
    swin, unetr = SSL_ENCODERS["swin_unetr"], SSL_ENCODERS["unetr"]
    assert swin.url == "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt"
    assert swin.file_name == "model_swinvit.pt" and swin.sha256 is None and swin.model["feature_size"] == 48
    assert unetr.url is None and unetr.file_name == "best_model.pt" and unetr.model["pos_embed"] == "conv"
    assert ssl.map_key("layers1.0.blocks.0.mlp.fc2.bias", swin) == "swinViT.layers1.0.blocks.0.mlp.linear2.bias"
    assert ssl.map_key("swin_vit.patch_embed.proj.weight", swin) == "swinViT.patch_embed.proj.weight"  # older name
    assert ssl.map_key("blocks.0.attn.qkv.weight", unetr) == "vit.blocks.0.attn.qkv.weight"
