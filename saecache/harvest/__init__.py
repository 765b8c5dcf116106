"""Stage one: tokenise a dataset, run the model once, write every chosen layer's residuals into the cache."""
