"""Measures. Reconstructions of a split: ``split`` (per-image scores), ``realism`` (whether
they pass for real slices), ``atlas`` (the report's example and codebook arrays),
``evaluation`` (the ``evaluate`` command's folder) and ``reconstruct`` (one file). Generated
slices: ``samples`` (the ``evaluate-samples`` command), ``comparisons``, ``sample_metrics``,
``distances`` and ``features``."""
