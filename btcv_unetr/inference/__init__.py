"""Inference: the cases of a run (``cases``), models loaded for it (``loader``), the ``Predictor``, the sliding window's
settings (``sliding_window``), the way back to each scan's grid (``inversion``), the batch run (``batch``) and its
command line (``command``); reports and distances (``evaluate``), pictures (``plots``), a mask's provenance
(``provenance``), DICOM SEG, ensembles, parts and export."""
