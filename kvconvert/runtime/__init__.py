"""Runtime: run converted models (latent cache, sparse attention) inside transformers."""
