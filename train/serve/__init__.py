"""Serving the trained model (export, index, HTTP): empty until the serving issue."""
