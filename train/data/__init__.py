"""The prepared data directory and everything that reads it: layout, catalog, collate, stream; prepare/ makes it."""
