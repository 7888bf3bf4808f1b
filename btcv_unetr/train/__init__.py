"""Training: the epoch loop (``loop``), its run folder (``run_folder``), time budget (``budget``), loss, optimiser and
schedule (``loss``, ``optim``), cross-validation (``crossval``) and the command line (``command``)."""
