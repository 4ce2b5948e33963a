"""The revenue report's rollups (reports/rollups.py): closed days' figures, kept once."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    SmallInteger,
    String,
    Table,
)

from ciris_billing.tables.base import Id, Minor, Timestamp, metadata

# Per closed UTC day and currency: the revenue report's figures, and deferred revenue at the
# day's end. A closed day never changes (its movements are all in, and each lot's value before
# it is fixed), so it is computed once.
revenue_days = Table(
    "revenue_days",
    metadata,
    Column("day", Date, primary_key=True),
    Column("currency", String(3), primary_key=True),
    Column("purchases_minor", Minor, nullable=False),
    Column("refunds_minor", Minor, nullable=False),
    Column("recognized_minor", Minor, nullable=False),
    Column("breakage_minor", Minor, nullable=False),
    Column("deferred_end_minor", Minor, nullable=False),
)

# Per paid lot: its exhausted uses (reports/revenue.py) up to the rollup's `rolled_until`, so a
# new day's values start from there without reading the lot's history again.
revenue_lot_states = Table(
    "revenue_lot_states",
    metadata,
    Column("lot_id", Id, primary_key=True),
    Column("exhausted_uses", BigInteger, nullable=False),
)

# One row (id 1): the days before `rolled_until` are in revenue_days and revenue_lot_states.
revenue_rollup = Table(
    "revenue_rollup",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("rolled_until", Date, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint("id = 1", name="one_row"),
)

# Per closed UTC day: uses by lot kind and feature (the usage report's rollup).
usage_days = Table(
    "usage_days",
    metadata,
    Column("day", Date, primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("feature", String(64), primary_key=True),
    Column("uses", BigInteger, nullable=False),
)

# Accounts with a charge in a closed period: a day (YYYY-MM-DD) or a month (YYYY-MM); distinct
# counts do not add up, so each period is counted once when it closes.
usage_active = Table(
    "usage_active",
    metadata,
    Column("period", String(10), primary_key=True),
    Column("accounts", BigInteger, nullable=False),
)
