"""Rewrites: model in, (new model, [Change]) out. Passes never load files or print."""
