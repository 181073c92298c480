from mri_vqvae.cli import run

run()
