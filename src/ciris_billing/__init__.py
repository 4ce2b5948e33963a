"""CIRIS Billing: free uses, paid uses and a ledger that cannot go wrong."""

__version__ = "0.1.0"
