"""The VQ-VAE and its parts."""

from mri_vqvae.model.quantizer import QuantizerOutput, VectorQuantizer
from mri_vqvae.model.vqvae import VQVAE, VQVAEOutput

__all__ = ["VQVAE", "QuantizerOutput", "VQVAEOutput", "VectorQuantizer"]
