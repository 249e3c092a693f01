"""Datasets, long-tail construction, the input pipeline and the spectrum store."""
