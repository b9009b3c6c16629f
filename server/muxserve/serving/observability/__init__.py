"""Prometheus metrics, Triton statistics and shadow comparison against the baseline."""
