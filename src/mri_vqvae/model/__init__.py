"""The networks: layers, encoder, decoder, quantizer, the VQ-VAE, and the priors over its
codes (prior, which knows only integers). Knows nothing of files."""

from mri_vqvae.model.quantizer import QuantizerOutput, VectorQuantizer
from mri_vqvae.model.vqvae import VQVAE, VQVAEOutput

__all__ = ["VQVAE", "QuantizerOutput", "VQVAEOutput", "VectorQuantizer"]
