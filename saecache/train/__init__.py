"""Stage two: read a layer of the cache and train its sister SAEs in one read pass."""
