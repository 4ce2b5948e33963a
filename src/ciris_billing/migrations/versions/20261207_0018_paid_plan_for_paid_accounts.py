"""paid plan for accounts that paid: plan_name `paid` where a `free` account has had paid uses

Revision ID: 20261207_paid_plan
Revises: 20261207_portal_revocations
Create Date: 2026-12-07 15:30:00

Issue 21 finding 15 made plan_name `paid` once an account first gets paid uses (a credited
purchase, a grant, an initial balance); accounts that got them before still say `free` and so
missed balance.low's default threshold. Data only: the same rule, read from the ledger (a
`purchase`, `grant` or `initial_balance` credit with paid uses); an app's own plan stays.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261207_paid_plan"
down_revision: str | None = "20261207_portal_revocations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One statement, plan_name guarded by 'free': an account credited meanwhile is already
    # 'paid' (same value), and one on an app's own plan is never touched.
    op.execute(
        "UPDATE accounts SET plan_name = 'paid' WHERE plan_name = 'free' AND EXISTS ("
        "SELECT 1 FROM credits WHERE credits.account_id = accounts.id "
        "AND credits.kind IN ('purchase', 'grant', 'initial_balance') "
        "AND credits.paid_uses_delta > 0)"
    )


def downgrade() -> None:
    # Data only: which accounts were `free` before cannot be told apart afterwards; nothing to undo.
    pass
