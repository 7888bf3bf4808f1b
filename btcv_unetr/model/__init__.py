"""The networks and their weights: UNETR built from the config (``build``), its speed switches (``speed``), weights
from every kind of file into it (``weights``; a TorchScript UNETR's settings and weights: ``torchscript``) and the
released weights by name (``pretrained``). File formats are read in ``btcv_unetr.io``."""
