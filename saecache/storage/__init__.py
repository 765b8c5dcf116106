"""The cache between the stages: one Zarr v3 group of tokens, residuals, statistics and commit record."""
