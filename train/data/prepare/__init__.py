"""`rectrain prepare`: raw interaction log + catalog -> shards, catalog, splits, manifest (run.py is the entry)."""
