"""The client's version (its User-Agent says it)."""

__version__ = "0.1.0"
