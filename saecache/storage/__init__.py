"""The cache between the two stages: a Zarr v3 group, its layout, commit record and checks."""
