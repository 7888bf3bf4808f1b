"""Helpers the test suite and the benchmarks share; nothing in the package proper imports them."""
