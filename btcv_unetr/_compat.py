"""Old import paths: before the sub-packages (0.2), every module sat directly under ``btcv_unetr``.

``btcv_unetr.infer``, ``btcv_unetr.train``, ``btcv_unetr.data`` and ``btcv_unetr.model`` keep giving the names they gave
(looked up in their new homes on first use); any other old module path fails with one line naming its new home.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Callable
from typing import Any

# Old module -> new module, for the modules whose old path no longer exists.
MOVED = {
    "checks": "data.checks", "transforms": "data.transforms", "images": "data.images", "importers": "data.importers",
    "phantoms": "synthetic.phantoms", "shapes2d": "synthetic.shapes2d",
    "checkpoint": "model.checkpoint", "precision": "model.precision", "pretrained": "model.pretrained",
    "bundle": "model.bundle", "provenance": "model.provenance",
    "loss": "train.loss", "optim": "train.optim", "crossval": "train.crossval",
    "ensemble": "inference.ensemble", "infer_parts": "inference.parts", "dicom_seg": "inference.dicom_seg",
    "evaluate": "inference.evaluate", "plots": "inference.plots", "export": "inference.export",
}


def forwarded_names(package: str, homes: tuple[str, ...]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that finds an old module's name in ``homes`` (its new modules, relative to
    ``package``), imported on first use only: importing the package stays as light as before."""
    def __getattr__(name: str) -> Any:
        if not name.startswith("__"):
            for home in homes:
                module = importlib.import_module(home, package)
                if hasattr(module, name):
                    return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: asked only for modules no other finder has, it names the new home of a moved one."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        package, _, old = fullname.partition(".")
        if package == "btcv_unetr" and MOVED.get(old):
            raise ModuleNotFoundError(f"{fullname} moved to btcv_unetr.{MOVED[old]} (version 0.2): import it from there",
                                      name=fullname)
        return None


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
