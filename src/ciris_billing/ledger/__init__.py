"""The money core: the only code that changes balances and writes ledger rows.

- rules.py: the consumption rule, once (the order of lots, and the SQL the hot statements
  render from it); functions.py: the walk's SQL functions, as the database holds them;
- statements.py, capture_statements.py: the hot statements (charge, hold, capture, each alone
  and batched), rendered from rules.py; the fast path (accounts/hot/) sends them;
- holds.py: the framework path's hold, capture, release and hold expiry (holds given back to
  their lots); balance.py: what an account can give at an instant (its Python twin);
- free_periods.py: FREE_USES_RESET=monthly, a month's free lot added once;
- wallet.py: lots added to (and removed from) an account's wallet, in order, with its counters;
- credits.py: the `credits` ledger rows.
"""

from ciris_billing.ledger.credits import write_credit

__all__ = ["write_credit"]
