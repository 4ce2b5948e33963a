"""The customer portal: a signed link per account (links.py), its pages (routes.py)."""
