"""Training, evaluation and model-level benchmarks."""
