"""Training: the epoch loop (``loop``), its run folder (``run_folder``), the time budget's hook (``budget``), loss,
optimiser and schedule (``loss``, ``optim``), the model card it writes into checkpoints (``card``), cross-validation
(``crossval``) and the command line (``command``)."""
