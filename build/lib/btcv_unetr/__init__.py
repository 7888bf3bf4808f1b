"""UNETR for 3D multi-organ segmentation of abdominal CT (BTCV), on MONAI and PyTorch."""

__version__ = "0.1.0"
