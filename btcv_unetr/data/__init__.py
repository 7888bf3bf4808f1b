"""Data: datalists (``datalist``), reading and writing every image format (``images``), the transform chains
(``transforms``), ``check-data`` (``checks``) and public datasets as datalists (``importers``)."""

from .._compat import forwarded_names

__getattr__ = forwarded_names(__name__, (".datalist",))  # btcv_unetr.data was the datalist module before 0.2
