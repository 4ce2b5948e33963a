"""the hot wallet: the walk answers with the lots it touched; a lighter wallet CHECK

Revision ID: 20261207_hot_wallet
Revises: 20261207_lots_expiring
Create Date: 2026-12-07 20:10:00

Issue 23's speed. `ledger_take` (ledger/functions.py, the same text): the walk on the account's
wallet answering with the lots it touched (ids, kinds, uses), kept by the hot statements in
`last_lot_ids`, `last_lot_kinds`, `last_lot_uses` (now the touched lots only, not a take per
slot), so their RETURNING calls no function; `ledger_usable`: what the unexpired lots of one
side give, and `ledger_slotwise` (the capture's slot-by-slot arithmetic), so no subquery is
set up on each run. The account's ten "not below 0" CHECKs
(nine counts, the wallet's lots) become one, and the wallet's three cardinality tests go (by
construction and audited): PostgreSQL compiles every CHECK on each statement, ~8% of a charge.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "20261207_hot_wallet"
down_revision: str | None = "20261207_lots_expiring"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TAKE = """
DECLARE
    slots integer := coalesce(cardinality(p_left), 0);
    need bigint := p_uses;
    part bigint;
    l bigint;
BEGIN
    free_taken := 0;
    other_taken := 0;
    FOR i IN 1 .. slots LOOP
        l := p_left[i];
        CONTINUE WHEN l = 0 OR p_expires[i] <= p_at;
        part := LEAST(l, need);
        IF ids IS NULL THEN
            IF part = need THEN
                new_left := p_left[1 : i - 1] || (l - part) || p_left[i + 1 :];
                ids := ARRAY[p_ids[i]];
                kinds := ARRAY[p_kinds[i]];
                taken := ARRAY[part];
                IF p_kinds[i] = 0 THEN
                    free_taken := part;
                ELSE
                    other_taken := part;
                END IF;
                RETURN;
            END IF;
            new_left := p_left;
            ids := ARRAY[p_ids[i]];
            kinds := ARRAY[p_kinds[i]];
            taken := ARRAY[part];
        ELSE
            ids := ids || p_ids[i];
            kinds := kinds || p_kinds[i];
            taken := taken || part;
        END IF;
        new_left[i] := l - part;
        need := need - part;
        IF p_kinds[i] = 0 THEN
            free_taken := free_taken + part;
        ELSE
            other_taken := other_taken + part;
        END IF;
        EXIT WHEN need = 0;
    END LOOP;
    IF need > 0 OR ids IS NULL THEN
        new_left := NULL;
        ids := NULL;
        kinds := NULL;
        taken := NULL;
        free_taken := NULL;
        other_taken := NULL;
    END IF;
END
"""

USABLE = """
DECLARE
    total bigint := 0;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_left), 0) LOOP
        IF (p_kinds[i] = 0) = p_free AND (p_expires[i] IS NULL OR p_expires[i] > p_at) THEN
            total := total + p_left[i];
        END IF;
    END LOOP;
    RETURN total;
END
"""

SLOTWISE = """
DECLARE
    result bigint[] := p_a;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_a), 0) LOOP
        IF p_free_zero THEN
            IF p_b[i] = 0 THEN
                result[i] := 0;
            END IF;
        ELSE
            result[i] := p_a[i] - p_b[i];
        END IF;
    END LOOP;
    RETURN result;
END
"""

FUNCTIONS = (
    (
        "ledger_take",
        "p_ids varchar[], p_left bigint[], p_kinds smallint[], p_expires timestamptz[], "
        "p_uses bigint, p_at timestamptz, OUT new_left bigint[], OUT ids varchar[], "
        "OUT kinds smallint[], OUT taken bigint[], OUT free_taken bigint, "
        "OUT other_taken bigint",
        "record",
        TAKE,
    ),
    (
        "ledger_usable",
        "p_left bigint[], p_kinds smallint[], p_expires timestamptz[], p_at timestamptz, "
        "p_free boolean",
        "bigint",
        USABLE,
    ),
    ("ledger_slotwise", "p_a bigint[], p_b bigint[], p_free_zero boolean", "bigint[]", SLOTWISE),
)
DROP_SIGNATURES = (
    "ledger_take(varchar[], bigint[], smallint[], timestamptz[], bigint, timestamptz)",
    "ledger_usable(bigint[], smallint[], timestamptz[], timestamptz, boolean)",
    "ledger_slotwise(bigint[], bigint[], boolean)",
)
# The CHECKs that ck_accounts_counts_not_negative replaces: (name, condition).
SEPARATE = (
    ("free_uses_not_negative", "free_uses_remaining >= 0"),
    ("paid_uses_not_negative", "paid_uses_remaining >= 0"),
    ("total_uses_not_negative", "total_uses >= 0"),
    ("last_charge_free_uses_not_negative", "last_charge_free_uses >= 0"),
    ("held_uses_not_negative", "held_uses >= 0"),
    ("reserved_free_uses_not_negative", "reserved_free_uses >= 0"),
    ("reserved_paid_uses_not_negative", "reserved_paid_uses >= 0"),
    ("refund_owed_uses_not_negative", "refund_owed_uses >= 0"),
    ("event_sequence_not_negative", "event_sequence >= 0"),
)
COUNTS_NOT_NEGATIVE = (
    "free_uses_remaining >= 0 AND paid_uses_remaining >= 0 AND total_uses >= 0 "
    "AND last_charge_free_uses >= 0 AND held_uses >= 0 AND reserved_free_uses >= 0 "
    "AND reserved_paid_uses >= 0 AND refund_owed_uses >= 0 AND event_sequence >= 0 "
    "AND 0 <= ALL (lot_left)"
)
WALLET_CONSISTENT = (
    "cardinality(lot_left) = cardinality(lot_ids) "
    "AND cardinality(lot_kinds) = cardinality(lot_ids) "
    "AND cardinality(lot_expires) = cardinality(lot_ids) AND 0 <= ALL (lot_left)"
)


def upgrade() -> None:
    for name, arguments, returns, body in FUNCTIONS:
        op.execute(
            f"CREATE OR REPLACE FUNCTION {name}({arguments}) RETURNS {returns} "
            f"LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn${body}$fn$"
        )
    empty = sa.text("'{}'")
    op.add_column(
        "accounts",
        sa.Column(
            "last_lot_ids",
            postgresql.ARRAY(sa.String(40)),
            server_default=empty,
            nullable=False,
        ),
    )
    op.add_column(
        "accounts",
        sa.Column(
            "last_lot_kinds",
            postgresql.ARRAY(sa.SmallInteger()),
            server_default=empty,
            nullable=False,
        ),
    )
    # last_lot_uses now holds the touched lots' uses only. What it holds now (a take per slot)
    # is never read: only RETURNING reads it, after the statement's own walk wrote it.
    op.drop_constraint(op.f("ck_accounts_wallet_consistent"), "accounts", type_="check")
    for name, _condition in SEPARATE:
        op.drop_constraint(op.f(f"ck_accounts_{name}"), "accounts", type_="check")
    op.create_check_constraint(
        op.f("ck_accounts_counts_not_negative"), "accounts", COUNTS_NOT_NEGATIVE
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_accounts_counts_not_negative"), "accounts", type_="check")
    for name, condition in SEPARATE:
        op.create_check_constraint(op.f(f"ck_accounts_{name}"), "accounts", condition)
    op.create_check_constraint(op.f("ck_accounts_wallet_consistent"), "accounts", WALLET_CONSISTENT)
    op.drop_column("accounts", "last_lot_kinds")
    op.drop_column("accounts", "last_lot_ids")
    for signature in DROP_SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
