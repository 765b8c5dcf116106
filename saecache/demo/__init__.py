"""`saecache demo`: the tiny built-in GPT-NeoX and the whole pipeline on it, offline."""
