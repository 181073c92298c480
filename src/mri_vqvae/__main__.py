from mri_vqvae.cli import main

raise SystemExit(main())
