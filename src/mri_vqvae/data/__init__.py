"""Reading slices: NIfTI files (nifti), splits decoded once and cached (dataset), and the
synthetic demo phantom (phantom). Knows nothing of models."""
