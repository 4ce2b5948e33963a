"""The `carry` charge texts are the plain ones with uses computed from the locked row's carry;
the plain texts do not mention rates at all (their cost is unchanged)."""

from __future__ import annotations

import pytest

from ciris_billing.ledger import statements
from ciris_billing.ledger.carry import carry_assignment, carry_uses
from ciris_billing.ledger.rules import can_take, head_assignment, head_covers, walk_assignment

ONE = ("", "$13::text", "$3::bigint", "$14::bigint", "$11::timestamptz")
BATCH = ("a.", "i.feature", "i.quantity", "i.units", "i.created_at")


@pytest.mark.parametrize("monthly", [False, True])
@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("batch", [False, True])
def test_carry_texts_apply_the_rule_to_the_carried_uses(
    monthly: bool, head: bool, batch: bool
) -> None:
    row, feature, quantity, units, at = BATCH if batch else ONE
    render = statements.charge_batch_sql if batch else statements.charge_sql
    sql = render(monthly, head=head, rated="carry")
    uses = carry_uses(row, feature, quantity, units)
    if head:
        # The head text also makes a charge that completes no use (0 uses, no lot named).
        assert f"({uses} = 0 OR {head_covers(row, uses, at)})" in sql
        assert head_assignment(row, uses, maybe_none=True) in sql
        assert "ledger_take(" not in sql
    else:
        assert can_take(row, uses, at) in sql
        assert walk_assignment(row, uses, at) in sql
        assert f"AND {uses} > 0" in sql  # the walk takes at least one use
    assert carry_assignment(row, feature, quantity, units) in sql


@pytest.mark.parametrize("monthly", [False, True])
@pytest.mark.parametrize("head", [False, True])
def test_plain_and_up_texts_take_no_carry(monthly: bool, head: bool) -> None:
    for rated in (None, "up"):
        for sql in (
            statements.charge_sql(monthly, head=head, rated=rated),
            statements.charge_batch_sql(monthly, head=head, rated=rated),
        ):
            assert "carry" not in sql
            assert ("feature" in sql) is (rated is not None)
