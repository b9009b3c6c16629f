"""Benchmarking: load generation, serving benchmarks, FLOPs."""
