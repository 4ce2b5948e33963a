"""Accounts: identity, free and paid uses, credit checks, charges and the ledger."""
