"""Rates: how a feature's quantity (tokens, seconds, images...) turns into uses."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Column, String, Table

from ciris_billing.tables.base import Timestamp, metadata

RATE_ROUNDINGS = ("up", "carry")

rates = Table(
    "rates",
    metadata,
    Column("feature", String(64), primary_key=True),
    # One use per this many units of the feature.
    Column("units_per_use", BigInteger, nullable=False),
    # `up`: each request rounds up on its own; `carry`: the account keeps the remainder
    # (accounts.carry_features / carry_left) for the next request of the feature.
    Column("rounding", String(8), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint("units_per_use > 0", name="units_positive"),
    CheckConstraint("rounding IN ('up', 'carry')", name="rounding_known"),
    CheckConstraint("feature ~ '^[a-z0-9][a-z0-9_.:-]{0,63}$'", name="feature_shape"),
)
