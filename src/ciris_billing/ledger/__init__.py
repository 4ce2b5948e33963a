"""The money core: the only code that changes balances and writes ledger rows.

- rules.py: the consumption rule, once (the order of lots, and the SQL the hot statements
  render from it); functions.py: the walk's SQL functions, as the database holds them;
- wallet.py: lots added to (and removed from) an account's wallet, in order, with its counters;
- credits.py: the `credits` ledger rows.
"""

from ciris_billing.ledger.credits import write_credit

__all__ = ["write_credit"]
