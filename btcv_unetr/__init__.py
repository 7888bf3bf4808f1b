"""UNETR for 3D multi-organ segmentation of abdominal CT (BTCV), on MONAI and PyTorch.

Sub-packages by pipeline stage, each importing only those below it (``.importlinter`` checks it):
``serve`` > ``train`` > ``inference`` > ``model`` > ``data`` | ``synthetic`` > the shared modules here
(``config``, ``errors``, ``files``, ``labels``, ``logs``, ``distributed``, ``allocator``). ``cli`` is on top.
"""

from . import _compat

__version__ = "0.2.0"

_compat.install()  # old module paths (btcv_unetr.checkpoint ...) fail with a line naming their new home
