"""Weights files and their model cards, the manifests that list them, the hub that fetches them."""
