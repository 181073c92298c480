"""mri-vqvae: a discrete generative model of 2D MRI slices with a VQ-VAE."""

__version__ = "0.1.0"
