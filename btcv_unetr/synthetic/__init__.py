"""Synthetic data for the demo and the tests: BTCV-like CT phantoms (``phantoms``) and 2D scenes (``shapes2d``)."""
