"""The model: UNETR built from the config (``build``), its speed switches (``speed``), weights from every kind of file
(``weights``), checkpoints (``checkpoint``), the precision decision (``precision``), released weights and MONAI bundles
(``pretrained``, ``bundle``) and the model card (``provenance``)."""

from .._compat import forwarded_names

# btcv_unetr.model was build + speed + weights before 0.2.
__getattr__ = forwarded_names(__name__, (".build", ".speed", ".weights"))
