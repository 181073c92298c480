"""Measures: reconstructions of a split (reconstruction) and generated slices (samples,
sample_metrics)."""
