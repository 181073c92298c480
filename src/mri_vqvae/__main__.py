from mri_vqvae.cli.main import run

run()
