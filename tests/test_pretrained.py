"""``--pretrained``: released weights by name or URL, downloaded once from a loopback HTTP server into the user's
cache, verified by SHA-256, reused; a wrong checksum refused with nothing kept; offline, one line."""

from __future__ import annotations

import functools
import hashlib
import stat
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

from btcv_unetr import cli
from btcv_unetr.config.load import build_config
from btcv_unetr.errors import UserError
from btcv_unetr.model import pretrained
from btcv_unetr.model.architectures import architecture_of, roi_problem
from btcv_unetr.model.build import build_model
from btcv_unetr.model.pretrained import RELEASED, Released, resolve_pretrained
from btcv_unetr.model.weights import load_pretrained

TINY_MODEL = {key: getattr(tiny_config().model, key) for key in ("roi_x", "roi_y", "roi_z", "feature_size",
                                                                 "hidden_size", "mlp_dim", "num_heads")}
TINY_SPACING = {"space_x": 6.0, "space_y": 6.0, "space_z": 6.0}


class Served:
    """A folder served on 127.0.0.1 (a free port), with the paths it was asked for."""

    def __init__(self, folder: Path):
        self.requests: list[str] = []
        served = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                served.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def weights(tmp_path) -> Path:
    """The tiny model's seeded weights as a bare state dict, as the released ``.pth`` is."""
    torch.manual_seed(5)
    path = tmp_path / "served" / "tiny_unetr.pth"
    path.parent.mkdir()
    torch.save(build_model(tiny_config().model).state_dict(), path)
    return path


@pytest.fixture
def server(weights):
    served = Served(weights.parent)
    yield served
    served.close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """This test's own user cache; returns its weights folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "btcv-unetr" / "weights"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish(monkeypatch, url: str, digest: str | None) -> None:
    """A row ``tiny`` in the table of released weights."""
    monkeypatch.setitem(RELEASED, "tiny", Released(url, digest, "the tiny test model", TINY_MODEL, TINY_SPACING))


def infer_config(value: str):
    return build_config([{"train": {"pretrained": value}}])


def test_the_table_names_the_released_unetr_btcv_weights_and_says_no_checksum_is_published():
    entry = RELEASED["unetr_btcv"]
    assert entry.url == "https://developer.download.nvidia.com/assets/Clara/monai/research/UNETR_model_best_acc.pth"
    assert entry.sha256 is None and entry.file_name == "UNETR_model_best_acc.pth"
    assert entry.model["feature_size"] == 16 and entry.model["hidden_size"] == 768 and entry.data["space_z"] == 2.0


def test_the_table_names_the_released_swin_unetr_btcv_weights_and_their_architecture_resolves(monkeypatch, tmp_path):
    entry = RELEASED["swin_unetr_btcv"]
    assert entry.url == ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                         "swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt")
    assert entry.sha256 is None and entry.file_name == "swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt"
    widths = [RELEASED[f"swin_unetr_btcv{size}"].model["feature_size"] for size in ("", "_small", "_tiny")]
    assert widths == [48, 24, 12]
    file = tmp_path / entry.file_name
    monkeypatch.setattr(pretrained, "fetch", lambda url, name, digest, label: file if url == entry.url else None)
    config = resolve_pretrained(infer_config("swin_unetr_btcv"), "infer")
    model, data = config.model, config.data
    assert architecture_of(model).title == "Swin UNETR" and roi_problem(model) is None
    assert (model.feature_size, model.roi_size, model.use_v2, model.out_channels) == (48, (96, 96, 96), False, 14)
    assert (data.pixdim, data.a_min, data.a_max, data.crop_before_resampling) == ((1.5, 1.5, 2.0), -175.0, 250.0, False)
    assert (Path(config.train.pretrained_dir), config.train.pretrained_model_name) == (tmp_path, file.name)


def test_a_file_of_the_swin_unetr_btcv_layout_loads_strictly(tmp_path, cache, monkeypatch):
    """The recipe's trainer.py writes {"epoch", "best_acc" (a numpy float), "state_dict"}: the table's architecture
    (at the tiny net's width and ROI) loads it whole, strictly."""
    tiny_swin = {**RELEASED["swin_unetr_btcv"].model, "feature_size": 12, "roi_x": 64, "roi_y": 64, "roi_z": 64}
    torch.manual_seed(5)
    state = build_model(build_config([{"model": tiny_swin}]).model).state_dict()
    served_file = tmp_path / "served" / "swin_tiny.pt"
    served_file.parent.mkdir()
    torch.save({"epoch": 4999, "best_acc": np.float64(0.8225), "state_dict": state}, served_file)
    served = Served(served_file.parent)
    try:
        monkeypatch.setitem(RELEASED, "tiny_swin", Released(f"{served.url}/swin_tiny.pt", sha256(served_file),
                                                            "a tiny Swin UNETR", tiny_swin, TINY_SPACING))
        config = resolve_pretrained(build_config([{"train": {"pretrained": "tiny_swin"}}]), "train")
    finally:
        served.close()
    assert config.model.model_name == "swin_unetr" and config.train.resume_ckpt
    model = build_model(config.model)
    load_pretrained(model, Path(config.train.pretrained_dir) / config.train.pretrained_model_name)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_a_released_name_is_downloaded_once_verified_kept_privately_and_reused(weights, server, cache, monkeypatch,
                                                                               capsys):
    publish(monkeypatch, f"{server.url}/tiny_unetr.pth", sha256(weights))
    config = resolve_pretrained(infer_config("tiny"), "infer")
    cached = cache / "tiny_unetr.pth"
    assert (Path(config.train.pretrained_dir), config.train.pretrained_model_name) == (cache, "tiny_unetr.pth")
    assert config.model.feature_size == TINY_MODEL["feature_size"] and config.data.space_z == 6.0  # the table's
    assert cached.read_bytes() == weights.read_bytes() and sorted(p.name for p in cache.iterdir()) == [cached.name]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert server.requests == ["/tiny_unetr.pth"]
    trained = resolve_pretrained(build_config([{"train": {"pretrained": "tiny"}}]), "train")
    assert trained.train.resume_ckpt and server.requests == ["/tiny_unetr.pth"]  # the cached file, not a download
    assert "downloading" in capsys.readouterr().out


def test_test_py_segments_with_the_downloaded_weights(weights, server, cache, monkeypatch, phantom_dir, tmp_path):
    """End to end: the masks are those of the same file given as a local state dict (--pretrained_dir)."""
    publish(monkeypatch, f"{server.url}/tiny_unetr.pth", sha256(weights))
    scan = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    masks = []
    for name, source in (("by_name", ["--pretrained", "tiny"]),
                         ("local", ["--config", "tiny.yaml", "--pretrained_dir", str(weights.parent),
                                    "--pretrained_model_name", weights.name])):
        argv = ["infer", *source, "--input", str(scan), "--output_dir", str(tmp_path / name), "--precision", "fp32",
                "--device", "cpu", "--sw_batch_size", "2", "--no-overlay"]
        assert cli.main(argv) == 0
        masks.append(np.asarray(nib.load(tmp_path / name / scan.name.replace(".nii.gz", "_seg.nii.gz")).dataobj))
    assert len(np.unique(masks[0])) > 3 and np.array_equal(*masks)


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(weights, server, cache, monkeypatch, capsys):
    publish(monkeypatch, f"{server.url}/tiny_unetr.pth", "0" * 64)
    assert cli.main(["infer", "--pretrained", "tiny", "--input", str(weights)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"does not have the SHA-256 {'0' * 64}: refused and deleted" in err
    assert server.requests == ["/tiny_unetr.pth"] and list(cache.iterdir()) == []


def test_offline_one_line_says_which_file_to_put_where(weights, cache, monkeypatch, capsys):
    closed = Served(weights.parent)
    url = f"{closed.url}/tiny_unetr.pth"
    closed.close()  # nothing listens on that port any more
    publish(monkeypatch, url, sha256(weights))
    assert cli.main(["infer", "--pretrained", "tiny", "--input", str(weights)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"put the file tiny_unetr.pth into {cache} and run again" in err
    (cache / "tiny_unetr.pth").write_bytes(weights.read_bytes())  # as the line says: then it runs offline
    assert resolve_pretrained(infer_config("tiny"), "infer").train.pretrained_model_name == "tiny_unetr.pth"


def test_a_url_needs_its_checksum_and_is_cached_under_it(weights, server, cache):
    url = f"{server.url}/tiny_unetr.pth"
    with pytest.raises(UserError, match=r"a URL needs the file's SHA-256: --pretrained '.*#sha256=<64 hex digits>'"):
        resolve_pretrained(infer_config(url), "infer")
    assert server.requests == []
    digest = sha256(weights)
    config = resolve_pretrained(infer_config(f"{url}#sha256={digest}"), "infer")
    assert config.train.pretrained_model_name == f"{digest[:16]}-tiny_unetr.pth"
    assert (cache / config.train.pretrained_model_name).read_bytes() == weights.read_bytes()


def test_without_a_published_checksum_the_first_download_is_pinned_and_later_runs_checked(weights, server, cache,
                                                                                         monkeypatch, capsys):
    publish(monkeypatch, f"{server.url}/tiny_unetr.pth", None)
    resolve_pretrained(infer_config("tiny"), "infer")
    digest = sha256(weights)
    assert f"no SHA-256 is published for this file; its SHA-256 is {digest}" in capsys.readouterr().out
    assert (cache / "tiny_unetr.pth.sha256").read_text().strip() == digest
    resolve_pretrained(infer_config("tiny"), "infer")  # the same file: accepted, no second download
    assert server.requests == ["/tiny_unetr.pth"]
    with (cache / "tiny_unetr.pth").open("ab") as handle:
        handle.write(b"changed")
    with pytest.raises(UserError, match="its SHA-256 is not .* delete it and run again"):
        resolve_pretrained(infer_config("tiny"), "infer")


@pytest.mark.parametrize("flags, message", [
    ({"checkpoint": "runs/x/model_final.pt"}, "--pretrained and --checkpoint (it resumes a run) exclude each other"),
    ({"resume_jit": True}, "--pretrained and --resume_jit exclude each other"),
])
def test_training_refuses_pretrained_with_another_start(flags, message, monkeypatch):
    monkeypatch.setattr(pretrained, "locate", lambda value: pytest.fail("nothing is fetched for a refused command"))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_pretrained(build_config([{"train": {"pretrained": "tiny", **flags}}]), "train")


def test_an_unknown_name_lists_the_released_ones(tmp_path):
    names = "swin_unetr_btcv, swin_unetr_btcv_small, swin_unetr_btcv_tiny, unetr_btcv"
    with pytest.raises(UserError, match=f"not a released model \\({names}\\), a URL, a MONAI bundle folder"):
        resolve_pretrained(infer_config(str(tmp_path / "missing")), "infer")
