"""New slices: code maps drawn from a prior, decoded by the VQ-VAE and written with geometry."""
