"""``btcv_unetr.infer`` before 0.2: its names (``Predictor``, ``run_inference``, ``probabilities_to_scan`` ...) now live
in ``btcv_unetr.inference``; they are still found here, imported on first use."""

from ._compat import forwarded_names

__getattr__ = forwarded_names("btcv_unetr.inference", (".batch", ".cases", ".loader", ".predictor", ".inversion",
                                                       ".sliding_window", ".command"))
