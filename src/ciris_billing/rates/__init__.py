"""Rates: a feature's quantity (tokens, seconds, images...) turned into uses."""
