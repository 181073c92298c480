"""Stage training: the one loop (loop.fit) and the two stages as tasks (vqvae, prior)."""
