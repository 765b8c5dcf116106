"""saecache: harvest residual streams once into a Zarr v3 cache, train SAEs from it."""

__version__ = "0.1.0"
