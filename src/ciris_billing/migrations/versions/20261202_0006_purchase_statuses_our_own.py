"""purchase statuses in our own words

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 07:55:00

Purchases stored Stripe's PaymentIntent statuses; they now store ours (db.PURCHASE_STATUSES),
each provider mapping its own. Existing rows are mapped as the providers now map them:
waiting for a payment method or a confirmation is `pending`; an authorised, uncaptured payment
is `processing` (we never ask for manual capture). The API still answers `pending` as the
guide's `requires_payment_method`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen: the statuses before and after this revision.
OLD_STATUSES = (
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "processing",
    "requires_capture",
    "succeeded",
    "failed",
    "canceled",
    "partially_refunded",
    "refunded",
)
NEW_STATUSES = (
    "pending",
    "requires_action",
    "processing",
    "succeeded",
    "failed",
    "canceled",
    "partially_refunded",
    "refunded",
)
TO_NEW = {
    "requires_payment_method": "pending",
    "requires_confirmation": "pending",
    "requires_capture": "processing",
}
TO_OLD = {"pending": "requires_payment_method"}


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _rename(mapping: dict[str, str]) -> None:
    purchases = sa.table("purchases", sa.column("status", sa.String))
    for old, new in mapping.items():
        op.execute(purchases.update().where(purchases.c.status == old).values(status=new))


def upgrade() -> None:
    # Drop the old check first: the new words would violate it.
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_purchases_status_known"), type_="check")
    _rename(TO_NEW)
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.create_check_constraint("status_known", _in("status", NEW_STATUSES))


def downgrade() -> None:
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_purchases_status_known"), type_="check")
    _rename(TO_OLD)
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.create_check_constraint("status_known", _in("status", OLD_STATUSES))
