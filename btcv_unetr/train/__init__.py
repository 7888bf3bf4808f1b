"""Training: the epoch loop (``loop``), its run folder (``run_folder``), time budget (``budget``), loss, optimiser and
schedule (``loss``, ``optim``), cross-validation (``crossval``) and the command line (``command``)."""

from .._compat import forwarded_names

# btcv_unetr.train was one module before 0.2: its names are still found here.
__getattr__ = forwarded_names(__name__, (".loop", ".run_folder", ".budget", ".command"))
