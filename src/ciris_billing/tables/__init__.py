"""The schema (SQLAlchemy Core tables), one module per area, all on `base.metadata`.

`ciris_billing.db` re-exports every name here.
"""
