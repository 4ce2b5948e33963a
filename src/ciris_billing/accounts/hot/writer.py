"""The one charge store: one statement per charge, and charges that queue up written together in
one statement (lanes.py), behind one call, `ChargeStore.charge(attempt)`.

A charge is one statement (CHARGE_SQL): the conditional UPDATE of the account feeds the INSERT
of the ledger row through a CTE, so it deducts only what is there and the row is written in the
same atomic statement. Under load most of PostgreSQL's work per charge is the statement and its
commit rather than the rows, so charges that queue up while every connection is busy are sent
together: BATCH_SQL applies the same UPDATE and INSERT to each of them in one statement — one
round trip, one commit. Each still deducts only from its own account's current balance (the
WHERE clause is per row), so the outcome for each charge is what it would be alone:

- a batch never holds two charges for one account (an UPDATE ... FROM updates a row only once;
  the second charge waits for the next batch), so a hot account is charged one at a time;
- a charge that cannot be made (no uses left, suspended, unknown, another currency than the
  account's, a retried key) simply returns no row, and its request takes the slow path as a
  single charge would;
- if the batch fails (a retried idempotency key racing its twin from the same API key, text
  the database refuses, any error the server answers), its charges are sent again one by one,
  each getting its own answer (lanes.py); a lost connection is every member's (the batch may
  have committed).

Balance events (events/outbox.py, the SQL in crossings.py): the same statement detects whether
the charge crossed the account's balance.low threshold (available before = available after +
uses; crossing iff before >= threshold > after) or emptied it (after = 0), takes the account's
next event sequence numbers in the UPDATE and writes the outbox rows through one more CTE that
inserts only when it crossed. Exactly once per crossing by construction: the crossing is
computed on the locked row by the one statement that moves it, however many charges race. A
charge that crosses nothing inserts nothing (no extra round trip either way). Measured
2026-12-02 on the shared 2-core machine, both statements drawn at random inside one pgbench
run: +0-7% latency per statement; end to end, servers of both versions driven at once:
charges/s 1.00 x (c=8), 1.03 x (c=32).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ciris_billing.accounts.hot.lanes import Lanes, Waiting
from ciris_billing.accounts.hot.pool import DuplicateKey, StatementPool
from ciris_billing.ledger import statements
from ciris_billing.ledger.statements import Rated

# The statements (ledger/statements.py): $1 provider, $2 external id, $3 uses, $4 idempotency
# key, $5 charge id, $6 amount, $7 currency, $8 description, $9 metadata (JSON text), $10
# request fingerprint, $11 the charge's time, $12 the API key's id; BATCH_SQL the same as arrays.
CHARGE_SQL = statements.CHARGE_SQL
BATCH_SQL = statements.CHARGE_BATCH_SQL
# The walk's common case in plain SQL (the head lot gives all the uses), sent first; a charge it
# makes no row for is sent again with the walk's text above (ledger/statements.py).
HEAD_SQL = statements.CHARGE_HEAD_SQL
HEAD_BATCH_SQL = statements.CHARGE_HEAD_BATCH_SQL


@dataclass(frozen=True, slots=True)
class ChargeAttempt:
    """One charge as the store sends it: who, what, and the ids and time it is recorded with."""

    oauth_provider: str
    external_id: str
    uses: int
    amount_minor: int
    currency: str
    description: str | None
    metadata_json: str  # the metadata as JSON text (the statement casts it)
    idempotency_key: str | None
    fingerprint: str | None  # computed at the edge from the validated request
    charge_id: str
    at: datetime
    api_key_id: str  # the API key that charges: its idempotency key's scope
    # A rated charge (rates/service.py): its feature, quantity and rounding; `up` charges
    # `uses` (rounded up), `carry` takes what the account's carry makes (units_per_use).
    rated: Rated = None
    feature: str | None = None
    quantity: int | None = None
    units_per_use: int | None = None

    def parameters(self) -> tuple[Any, ...]:
        """The statement's $1..$12, in the order CHARGE_SQL and BATCH_SQL name them (a rated
        charge's $13, $14 as ledger/statements.py says; `carry`: $3 the quantity)."""
        plain = (
            self.oauth_provider,
            self.external_id,
            self.quantity if self.rated == "carry" else self.uses,
            self.idempotency_key,
            self.charge_id,
            self.amount_minor,
            self.currency,
            self.description,
            self.metadata_json,
            self.fingerprint,
            self.at,
            self.api_key_id,
        )
        if self.rated is None:
            return plain
        last = self.quantity if self.rated == "up" else self.units_per_use
        return (*plain, self.feature, last)

    def below_one_use(self) -> bool:
        """A `carry` charge whose quantity alone makes no use: whether it completes one depends
        on the account's carry at the statement's time."""
        return self.rated == "carry" and (self.quantity or 0) < (self.units_per_use or 0)


# The texts a charge tries in order (ledger/statements.py): the head's, then the walk's; a text
# that makes no row for a charge passes it to the next. A `carry` charge below one use is made
# by the head text when it completes none (most do) as when the head lot covers the use.
_ORDER = ("head", "walk")
_CYCLES = 3


class ChargeStore(Lanes[ChargeAttempt]):
    """Makes charges through a few concurrent statements, batching those that wait. Created once
    at start-up (the app's lifespan); the only code that writes a charge."""

    def __init__(self, pool: StatementPool, lanes: int, *, monthly: bool = False) -> None:
        super().__init__("charge", lanes)
        self._statements = pool
        # monthly (FREE_USES_RESET=monthly): the statements also require the month's free lot.
        self._one = statements.charge_sql(True) if monthly else CHARGE_SQL
        self._batch = statements.charge_batch_sql(True) if monthly else BATCH_SQL
        self._head = statements.charge_sql(True, head=True) if monthly else HEAD_SQL
        self._head_batch = (
            statements.charge_batch_sql(True, head=True) if monthly else HEAD_BATCH_SQL
        )
        # (kind, text) -> (one, batch): the plain texts above and the rated ones.
        self._texts: dict[tuple[Rated, str], tuple[str, str]] = {
            (None, "head"): (self._head, self._head_batch),
            (None, "walk"): (self._one, self._batch),
        }
        for rated in ("up", "carry"):
            for step, head in (("head", True), ("walk", False)):
                self._texts[(rated, step)] = (
                    statements.charge_sql(monthly, head=head, rated=rated),
                    statements.charge_batch_sql(monthly, head=head, rated=rated),
                )

    def _steps(self, attempt: ChargeAttempt) -> list[tuple[str, str]]:
        """The (one, batch) texts `attempt` tries, in order."""
        steps = [self._texts[(attempt.rated, step)] for step in _ORDER]
        if not attempt.below_one_use():
            return steps
        # Below one use, whether it completes one depends on the carry at the statement's
        # time: a concurrent charge may change it between the texts (the head text finds a use
        # is due and the head lot cannot give it, then the walk finds none is due), so the
        # cycle is tried up to 3 times.
        return steps * _CYCLES

    async def charge(self, attempt: ChargeAttempt) -> Any:
        """The account's row after the charge (id, counters, last_charge_free_uses, plan_name;
        a rated charge's `uses`), or None when it was not made: no active account with enough
        uses, or the idempotency key already taken (the caller finds out which, outside the hot
        statement)."""
        # One account per batch (the lane key): an UPDATE ... FROM updates a row only once.
        return await self.submit((attempt.oauth_provider, attempt.external_id), attempt)

    async def _send_many(self, batch: list[Waiting[ChargeAttempt]]) -> None:
        # A batch that fails (a key taken twice: DuplicateKey, or any other error) has each
        # charge sent again alone by Lanes._alone, each getting its own answer. Charges of one
        # kind (plain, up, carry below a use, carry) go together through their texts in order;
        # those a text made no row for go on, together, to the next.
        # A charge is answered as soon as a text made it (committed: if a later text fails,
        # Lanes._alone sends again only the charges not answered yet).
        groups: dict[tuple[Rated, bool], list[Waiting[ChargeAttempt]]] = {}
        for waiting in batch:
            kind = (waiting.request.rated, waiting.request.below_one_use())
            groups.setdefault(kind, []).append(waiting)
        for group in groups.values():
            rest = group
            for _one, many in self._steps(group[0].request):
                parameters = (waiting.request.parameters() for waiting in rest)
                columns = [list(column) for column in zip(*parameters, strict=True)]
                rows = await self._statements.fetch_all(many, columns)
                made = {row["charge_id"]: row for row in rows}
                for waiting in rest:
                    if waiting.request.charge_id in made:
                        waiting.settle(made[waiting.request.charge_id])
                rest = [w for w in rest if w.request.charge_id not in made]
                if not rest:
                    break
        for waiting in batch:
            waiting.settle(None)  # the charges no text made (answered ones stay answered)

    async def _send_one(self, waiting: Waiting[ChargeAttempt]) -> None:
        row = None
        try:
            parameters = waiting.request.parameters()
            for one, _many in self._steps(waiting.request):
                row = await self._statements.fetch_one(one, parameters)
                if row is not None:
                    break
        except DuplicateKey:
            # Safe: the key's first use committed (the unique index waited for it); the caller
            # answers from that row, or 409, as for any charge not made.
            row = None
        waiting.settle(row)
