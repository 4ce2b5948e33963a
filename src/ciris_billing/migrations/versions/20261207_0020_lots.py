"""lots: every grant of uses a lot, the account's wallet, movements that name their lots

Revision ID: 20261207_lots
Revises: 20261207_paid_plan
Create Date: 2026-12-07 17:30:00

Issue 23. Schema: the `lots` table; on accounts the wallet (open lots in consumption order,
what each has left, its kind and expiry), `last_lot_uses`, `next_expiry_at`, `free_period`;
`lot_ids`/`lot_uses` on charges, reservations (and `lot_kinds`) and credits; the consumption
walk's SQL functions (ledger/functions.py, the same text).

Data, for a database with history (today's counters become lots, audit clean afterwards):
- the free uses: one free lot (what free_grant rows granted, at least what is left or held);
- each credited purchase: a paid lot (its price over its uses is the cost basis), each grant
  and initial balance a promotional lot, in the order they came;
- what is left (available + held by open reservations) belongs to the newest lots, since
  uses were spent oldest first; a lot refunded gives at most what the refund left in it; more
  left than the lots explain (adjustments) becomes one promotional `migration` lot;
- open holds took from the front of the consumption order: each reservation records the lots
  it holds;
- per lot, one `opening` credits row records what was spent before lots existed (counters
  unchanged: free/paid deltas 0), so each lot's remaining = granted + its movements.
"""

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "20261207_lots"
down_revision: str | None = "20261207_paid_plan"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = (
    "free_grant",
    "initial_balance",
    "purchase",
    "grant",
    "adjustment",
    "refund",
    "dispute_hold",
    "dispute_lost",
    "dispute_won",
    "owed_taken",
)
NEW_KINDS = (*OLD_KINDS, "opening", "expired", "void", "free_period")
LOT_STATUSES = ("active", "used", "expired", "voided", "erased")

# The walk's functions, as ledger/functions.py defines them at this revision (a later change
# to them is a new migration; tests/ledger/test_rules.py compares the database with the code).
WALK = """
DECLARE
    slots integer := coalesce(cardinality(p_left), 0);
    need bigint := p_uses;
    part bigint;
BEGIN
    new_left := p_left;
    taken := array_fill(0::bigint, ARRAY[slots]);
    free_taken := 0;
    other_taken := 0;
    FOR i IN 1 .. slots LOOP
        EXIT WHEN need <= 0;
        IF p_left[i] > 0 AND (p_expires IS NULL OR p_expires[i] IS NULL OR p_expires[i] > p_at)
        THEN
            part := LEAST(p_left[i], need);
            taken[i] := part;
            new_left[i] := p_left[i] - part;
            need := need - part;
            IF p_kinds[i] = 0 THEN
                free_taken := free_taken + part;
            ELSE
                other_taken := other_taken + part;
            END IF;
        END IF;
    END LOOP;
    IF need > 0 THEN
        new_left := NULL;
        taken := NULL;
        free_taken := NULL;
        other_taken := NULL;
    END IF;
END
"""
AVAILABLE = """
DECLARE
    total bigint := 0;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_left), 0) LOOP
        IF p_expires[i] IS NULL OR p_expires[i] > p_at THEN
            total := total + p_left[i];
        END IF;
    END LOOP;
    RETURN total;
END
"""
GIVE_BACK = """
DECLARE
    result bigint[] := p_left;
    slot integer;
BEGIN
    FOR k IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        CONTINUE WHEN p_uses[k] = 0;
        slot := array_position(p_wallet_ids, p_ids[k]);
        IF slot IS NULL THEN
            RAISE EXCEPTION 'lot % is not in the wallet', p_ids[k] USING ERRCODE = 'P0001';
        END IF;
        result[slot] := result[slot] + p_uses[k];
    END LOOP;
    RETURN result;
END
"""
TOUCHED = """
DECLARE
    result p_ids%TYPE := p_ids[1:0];
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        IF p_uses[i] <> 0 THEN
            result := result || p_ids[i];
        END IF;
    END LOOP;
    RETURN result;
END
"""
FUNCTIONS = (
    (
        "ledger_walk",
        "p_left bigint[], p_kinds smallint[], p_expires timestamptz[], p_uses bigint, "
        "p_at timestamptz, OUT new_left bigint[], OUT taken bigint[], OUT free_taken bigint, "
        "OUT other_taken bigint",
        "record",
        WALK,
    ),
    (
        "ledger_available",
        "p_left bigint[], p_expires timestamptz[], p_at timestamptz",
        "bigint",
        AVAILABLE,
    ),
    (
        "ledger_give_back",
        "p_wallet_ids varchar[], p_left bigint[], p_ids varchar[], p_uses bigint[]",
        "bigint[]",
        GIVE_BACK,
    ),
    ("ledger_touched", "p_ids anycompatiblearray, p_uses bigint[]", "anycompatiblearray", TOUCHED),
)
DROP_SIGNATURES = (
    "ledger_walk(bigint[], smallint[], timestamptz[], bigint, timestamptz)",
    "ledger_available(bigint[], timestamptz[], timestamptz)",
    "ledger_give_back(varchar[], bigint[], varchar[], bigint[])",
    "ledger_touched(anycompatiblearray, bigint[])",
)

KIND_RANK = {"free": 0, "promotional": 1, "paid": 2}


def _in(values: Sequence[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    ids = postgresql.ARRAY(sa.String(40))
    uses = postgresql.ARRAY(sa.BigInteger())
    for name, arguments, returns, body in FUNCTIONS:
        op.execute(
            f"CREATE OR REPLACE FUNCTION {name}({arguments}) RETURNS {returns} "
            f"LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn${body}$fn$"
        )
    op.create_table(
        "lots",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("100"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("uses_granted", sa.BigInteger(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("cost_basis_minor", sa.BigInteger()),
        sa.Column("purchase_id", sa.String(40)),
        sa.Column("credit_id", sa.String(40)),
        sa.Column("status", sa.String(16), server_default=sa.text("'active'"), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('free', 'promotional', 'paid')", name="kind_known"),
        sa.CheckConstraint(f"status IN {_in(LOT_STATUSES)}", name="status_known"),
        sa.CheckConstraint("uses_granted >= 0", name="granted_not_negative"),
        sa.CheckConstraint("amount_minor >= 0", name="amount_not_negative"),
        sa.CheckConstraint("kind = 'paid' OR amount_minor = 0", name="only_paid_lots_cost"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["purchase_id"], ["purchases.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_lots_account_id_created_at", "lots", ["account_id", "created_at"])
    op.create_index(
        "ix_lots_purchase_id",
        "lots",
        ["purchase_id"],
        unique=True,
        postgresql_where=sa.text("purchase_id IS NOT NULL"),
    )
    op.create_index(
        "ix_lots_open_expires_at",
        "lots",
        ["expires_at"],
        postgresql_where=sa.text("status = 'active' AND expires_at IS NOT NULL"),
    )
    empty = sa.text("'{}'")
    op.add_column("accounts", sa.Column("lot_ids", ids, server_default=empty, nullable=False))
    op.add_column("accounts", sa.Column("lot_left", uses, server_default=empty, nullable=False))
    op.add_column(
        "accounts",
        sa.Column(
            "lot_kinds", postgresql.ARRAY(sa.SmallInteger()), server_default=empty, nullable=False
        ),
    )
    op.add_column(
        "accounts",
        sa.Column(
            "lot_expires",
            postgresql.ARRAY(sa.DateTime(timezone=True)),
            server_default=empty,
            nullable=False,
        ),
    )
    op.add_column(
        "accounts", sa.Column("last_lot_uses", uses, server_default=empty, nullable=False)
    )
    op.add_column("accounts", sa.Column("next_expiry_at", sa.DateTime(timezone=True)))
    op.add_column("accounts", sa.Column("free_period", sa.DateTime(timezone=True)))
    op.create_check_constraint(
        "wallet_consistent",
        "accounts",
        "cardinality(lot_left) = cardinality(lot_ids) "
        "AND cardinality(lot_kinds) = cardinality(lot_ids) "
        "AND cardinality(lot_expires) = cardinality(lot_ids) AND 0 <= ALL (lot_left)",
    )
    for table in ("charges", "credits", "reservations"):
        op.add_column(table, sa.Column("lot_ids", ids))
        if table == "reservations":
            op.add_column(table, sa.Column("lot_kinds", postgresql.ARRAY(sa.SmallInteger())))
        op.add_column(table, sa.Column("lot_uses", uses))
    op.drop_constraint(op.f("ck_credits_kind_known"), "credits", type_="check")
    op.create_check_constraint("kind_known", "credits", f"kind IN {_in(NEW_KINDS)}")
    _lots_from_history(op.get_bind())


def downgrade() -> None:
    op.execute("DELETE FROM credits WHERE kind IN ('opening', 'expired', 'void', 'free_period')")
    op.drop_constraint(op.f("ck_credits_kind_known"), "credits", type_="check")
    op.create_check_constraint("kind_known", "credits", f"kind IN {_in(OLD_KINDS)}")
    for table in ("charges", "credits", "reservations"):
        op.drop_column(table, "lot_uses")
        if table == "reservations":
            op.drop_column(table, "lot_kinds")
        op.drop_column(table, "lot_ids")
    op.drop_constraint(op.f("ck_accounts_wallet_consistent"), "accounts", type_="check")
    for column in (
        "free_period",
        "next_expiry_at",
        "last_lot_uses",
        "lot_expires",
        "lot_kinds",
        "lot_left",
        "lot_ids",
    ):
        op.drop_column("accounts", column)
    op.drop_index("ix_lots_open_expires_at", table_name="lots")
    op.drop_index("ix_lots_purchase_id", table_name="lots")
    op.drop_index("ix_lots_account_id_created_at", table_name="lots")
    op.drop_table("lots")
    for signature in DROP_SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")


class _Lot:
    def __init__(self, lot_id: str, kind: str, source: str, granted: int, created_at: datetime):
        self.id = lot_id
        self.kind = kind
        self.source = source
        self.granted = granted
        self.capacity = granted  # what history could have left in it (refunds take some)
        self.created_at = created_at
        self.amount_minor = 0
        self.purchase_id: str | None = None
        self.credit_id: str | None = None
        self.inside = 0  # available + held, after history
        self.left = 0  # available
        self.held = 0


def _lots_from_history(bind: Any) -> None:
    now = datetime.now(UTC)
    grants: dict[str, list[Any]] = defaultdict(list)
    for row in bind.execute(
        sa.text(
            "SELECT c.id, c.account_id, c.kind, c.free_uses_delta, c.paid_uses_delta, "
            "c.created_at, p.id AS purchase_id, p.amount_minor, p.uses, p.uses_refunded "
            "FROM credits c LEFT JOIN purchases p "
            "ON c.kind = 'purchase' AND p.payment_id = c.external_transaction_id "
            "WHERE (c.kind = 'free_grant' AND c.free_uses_delta > 0) OR (c.kind IN "
            "('purchase', 'grant', 'initial_balance') AND c.paid_uses_delta > 0) "
            "ORDER BY c.created_at, c.id"
        )
    ):
        grants[row.account_id].append(row)
    # Uses open or lost disputes hold or removed, per purchase: they came out of the
    # purchase's own lot (a won dispute gives them back to it; lost, they are gone).
    disputed: dict[str, int] = defaultdict(int)
    for row in bind.execute(
        sa.text(
            "SELECT d.purchase_id, d.held_uses + CASE WHEN d.state = 'open' THEN coalesce(("
            "SELECT sum(c.held_uses_delta) FROM credits c WHERE c.kind = 'dispute_hold' AND "
            "c.external_transaction_id LIKE d.dispute_id || ':owed:%'), 0) ELSE 0 END AS held "
            "FROM disputes d WHERE d.state IN ('open', 'lost')"
        )
    ):
        disputed[row.purchase_id] += int(row.held or 0)
    holds: dict[str, list[Any]] = defaultdict(list)
    for row in bind.execute(
        sa.text(
            "SELECT id, account_id, free_uses_held, paid_uses_held FROM reservations "
            "WHERE status = 'held' ORDER BY created_at, id"
        )
    ):
        holds[row.account_id].append(row)
    accounts = bind.execute(
        sa.text(
            "SELECT id, currency, created_at, free_uses_remaining, paid_uses_remaining, "
            "reserved_free_uses, reserved_paid_uses FROM accounts ORDER BY id"
        )
    ).fetchall()
    for account in accounts:
        _migrate_account(bind, account, grants[account.id], holds[account.id], now, disputed)


def _migrate_account(
    bind: Any,
    account: Any,
    grants: list[Any],
    holds: list[Any],
    now: datetime,
    disputed: dict[str, int],
) -> None:
    free_inside = int(account.free_uses_remaining) + int(account.reserved_free_uses)
    paid_inside = int(account.paid_uses_remaining) + int(account.reserved_paid_uses)
    free: _Lot | None = None
    paid: list[_Lot] = []
    free_granted = sum(int(g.free_uses_delta) for g in grants if g.kind == "free_grant")
    if free_granted or free_inside:
        free = _Lot(
            _new_id(),
            "free",
            "free_grant",
            max(free_granted, free_inside),
            account.created_at,
        )
        free.credit_id = next((g.id for g in grants if g.kind == "free_grant"), None)
        free.inside = free_inside
    for grant in grants:
        if grant.kind == "free_grant":
            continue
        if grant.kind == "purchase":
            lot = _Lot(_new_id(), "paid", "purchase", int(grant.paid_uses_delta), grant.created_at)
            lot.purchase_id = grant.purchase_id
            lot.amount_minor = int(grant.amount_minor or 0)
            lot.capacity = (
                lot.granted
                - int(grant.uses_refunded or 0)
                - disputed.get(grant.purchase_id or "", 0)
            )
        else:
            lot = _Lot(
                _new_id(), "promotional", grant.kind, int(grant.paid_uses_delta), grant.created_at
            )
        lot.credit_id = grant.id
        paid.append(lot)
    # What is left belongs to the newest lots: uses were spent oldest first.
    remaining = paid_inside
    for lot in reversed(paid):
        lot.inside = min(max(lot.capacity, 0), remaining)
        remaining -= lot.inside
    if remaining > 0:  # more left than the grants explain (adjustments): one lot for it
        extra = _Lot(_new_id(), "promotional", "migration", remaining, now)
        extra.inside = remaining
        paid.append(extra)
    # The consumption order (ledger/rules.py with today's defaults: one priority, nothing
    # expires): kind (free, promotional, paid), then oldest.
    paid.sort(key=lambda lot: (KIND_RANK[lot.kind], lot.created_at, lot.id))
    ordered = ([free] if free is not None else []) + paid
    for lot in ordered:
        lot.left = lot.inside
    # Open holds took from the front of the consumption order.
    for hold in holds:
        held: list[tuple[_Lot, int]] = []
        for part, pool in (
            (int(hold.free_uses_held), [free] if free else []),
            (int(hold.paid_uses_held), paid),
        ):
            for lot in pool:
                if part == 0:
                    break
                take = min(lot.left, part)
                if take:
                    lot.left -= take
                    lot.held += take
                    part -= take
                    held.append((lot, take))
        bind.execute(
            sa.text(
                "UPDATE reservations SET lot_ids = :ids, lot_kinds = :kinds, lot_uses = :uses "
                "WHERE id = :id"
            ),
            {
                "id": hold.id,
                "ids": [lot.id for lot, _ in held],
                "kinds": [KIND_RANK[lot.kind] for lot, _ in held],
                "uses": [take for _, take in held],
            },
        )
    wallet = [lot for lot in ordered if lot.left > 0 or lot.held > 0]
    for lot in ordered:
        bind.execute(
            sa.text(
                "INSERT INTO lots (id, account_id, kind, source, priority, uses_granted, "
                "amount_minor, currency, cost_basis_minor, purchase_id, credit_id, status, "
                "closed_at, created_at) VALUES (:id, :account_id, :kind, :source, 100, "
                ":granted, :amount, :currency, :basis, :purchase_id, :credit_id, :status, "
                ":closed_at, :created_at)"
            ),
            {
                "id": lot.id,
                "account_id": account.id,
                "kind": lot.kind,
                "source": lot.source,
                "granted": lot.granted,
                "amount": lot.amount_minor,
                "currency": account.currency,
                "basis": (
                    lot.amount_minor // lot.granted if lot.kind == "paid" and lot.granted else None
                ),
                "purchase_id": lot.purchase_id,
                "credit_id": lot.credit_id,
                "status": "active" if lot in wallet else "used",
                "closed_at": None if lot in wallet else now,
                "created_at": lot.created_at,
            },
        )
        spent = lot.granted - lot.inside
        if spent:
            bind.execute(
                sa.text(
                    "INSERT INTO credits (id, account_id, kind, free_uses_delta, "
                    "paid_uses_delta, held_uses_delta, shortfall_uses, amount_minor, currency, "
                    "description, lot_ids, lot_uses, created_at) VALUES (:id, :account_id, "
                    "'opening', 0, 0, 0, 0, 0, :currency, :description, :ids, :uses, :at)"
                ),
                {
                    "id": _new_id("cr"),
                    "account_id": account.id,
                    "currency": account.currency,
                    "description": "Spent or refunded before lots existed",
                    "ids": [lot.id],
                    "uses": [-spent],
                    "at": now,
                },
            )
    bind.execute(
        sa.text(
            "UPDATE accounts SET lot_ids = :ids, lot_left = :left, lot_kinds = :kinds, "
            "lot_expires = :expires WHERE id = :id"
        ),
        {
            "id": account.id,
            "ids": [lot.id for lot in wallet],
            "left": [lot.left for lot in wallet],
            "kinds": [KIND_RANK[lot.kind] for lot in wallet],
            "expires": [None for _ in wallet],
        },
    )


def _new_id(prefix: str = "lot") -> str:
    import secrets

    return f"{prefix}_{secrets.token_hex(12)}"
