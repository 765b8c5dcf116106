"""After training: splice snapshots into the model on held-out tokens (CE loss recovered, KL, …)."""
