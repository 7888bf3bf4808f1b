"""UNETR for 3D multi-organ segmentation of abdominal CT (BTCV), on MONAI and PyTorch.

Rooms, each importing only those below it (``.importlinter`` checks it):
``serve`` | ``train`` > ``inference`` > ``model`` (the networks and their weights) > ``io`` (file formats) >
``data`` | ``synthetic`` > ``runtime`` (precision, allocator, cache) | ``distributed`` | ``logs`` | ``metrics`` >
``config`` > ``files`` | ``labels`` > ``errors``. ``cli`` and ``testing`` are on top.
"""

__version__ = "0.3.0"
