"""Sparse autoencoders: the model, its architectures, losses and metrics (no I/O)."""
