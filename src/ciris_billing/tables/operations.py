"""The installation's secrets, portal links, test clock, console sessions, audit trail, and
the console's look-up indexes.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    SmallInteger,
    String,
    Table,
    Text,
    func,
    text,
)

from ciris_billing.tables.base import (
    Id,
    Timestamp,
    metadata,
)
from ciris_billing.tables.ledger import accounts, charges
from ciris_billing.tables.payments import purchases

installation_secrets = Table(
    "installation_secrets",
    metadata,
    # Secrets made once per installation (installation.py): the first process to start
    # inserts them, every other worker, instance and restart reads the same ones.
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
)


portal_link_revocations = Table(
    "portal_link_revocations",
    metadata,
    # An account's portal links made before `revoked_at` are void (portal/links.py): links are
    # sealed and stateless to mint, so revocation is a time per account, read when one is opened.
    Column("account_id", Id, ForeignKey("accounts.id"), primary_key=True),
    Column("revoked_at", Timestamp, nullable=False),
)

test_clock = Table(
    "test_clock",
    metadata,
    # The sandbox's test clock (clock.py, testclock/): how far the installation's "now" is
    # ahead of the real time. One row at most (id 1); none means 0. Moves forward only.
    # updated_at: the real (wall-clock) time of the last advance.
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("offset_seconds", BigInteger, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint("id = 1", name="one_row"),
    CheckConstraint("offset_seconds >= 0", name="forward_only"),
)

console_sessions = Table(
    "console_sessions",
    metadata,
    # The operator console's server-side sessions (console/sessions.py). The cookie holds a
    # random 256-bit token; only its SHA-256 is stored, so a copy of this table logs no one in.
    Column("id", String(64), primary_key=True),
    Column("api_key_id", Id, ForeignKey("api_keys.id"), nullable=False),
    # Compared with every form the session posts (CSRF); random, per session.
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("last_seen_at", Timestamp, nullable=False),
    # The absolute end, whatever the activity (the idle end is last_seen_at + the idle limit).
    Column("expires_at", Timestamp, nullable=False),
    Index(None, "api_key_id"),
)

audit_trail = Table(
    "audit_trail",
    metadata,
    # Every operator action, whatever the door (audit_trail.py): who (the API key's name),
    # when, what, and the state before and after, written in the action's own transaction.
    Column("id", Id, primary_key=True),
    Column("created_at", Timestamp, nullable=False),
    Column("actor", String(100), nullable=False),
    Column("api_key_id", Id),
    # The door the action came through: 'api' (actor: the API key's name), 'cli' (actor: the
    # operating-system user) or 'console' (actor: the signed-in key's name).
    Column("door", String(16), nullable=False, server_default=text("'console'")),
    Column("action", String(32), nullable=False),
    Column("account_id", Id, ForeignKey("accounts.id")),
    # What the action was about besides the account: a payment, reservation, event or key id.
    Column("subject", String(255)),
    Column("detail", JSON, nullable=False),
    Column("before", JSON, nullable=False),
    Column("after", JSON, nullable=False),
    # The confirmation's one-time id: a confirmation submitted twice is applied once (the
    # second insert conflicts and its transaction, action included, rolls back).
    Column("request_id", String(64), nullable=False, unique=True),
    Index(None, "account_id", "created_at"),
    Index(None, "created_at"),
)


# The console's look-ups (console/queries.py). Searches match an identity or email whatever
# its case. The day's charges are counted through a BRIN index: rows arrive in time order, so
# it is a few pages and costs the charge INSERT next to nothing (a b-tree would be one more
# index insert per charge on the hot path).
Index("ix_accounts_lower_external_id", func.lower(accounts.c.external_id))
Index("ix_accounts_lower_customer_email", func.lower(accounts.c.customer_email))
Index("ix_charges_created_at_brin", charges.c.created_at, postgresql_using="brin")
Index("ix_purchases_created_at", purchases.c.created_at)
