"""`saecache report`: plots, tables and the loss-floor fit of a folder of runs."""
