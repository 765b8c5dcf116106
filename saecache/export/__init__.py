"""`saecache export`: SAELens folders or model-card .pt files, a generated model card, Hub upload."""

from saecache.export.export import export_pt, export_saelens, push

__all__ = ["export_pt", "export_saelens", "push"]
