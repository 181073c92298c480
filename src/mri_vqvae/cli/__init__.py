"""The command line: a thin layer over mri_vqvae.workflows."""

from mri_vqvae.cli.main import main, run

__all__ = ["main", "run"]
