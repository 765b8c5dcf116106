"""`saecache export`: SAELens folders or model-card .pt files, a generated model card, Hub upload."""
