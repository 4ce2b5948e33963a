"""Issue 23, item 1: the money core (src/ciris_billing/ledger/) is the only code that changes
balances or writes ledger rows. This test reads every module of src/ outside ledger/ (its AST
and its SQL texts) and fails on any write of an account's balance or wallet columns, and on
any insert into credits, charges or lots.

A write is: a keyword of `.values(...)` on an `accounts.update()` (or an insert into
accounts) naming a guarded column; a dict entry naming one whose value reads `accounts.c`
(values passed on as `**values`); an `UPDATE accounts ... SET <guarded column>` or
`INSERT INTO credits|charges|lots` in SQL text; `credits|charges|lots.insert()` or
`insert(credits|charges|lots)` / `insert_or_ignore(...)`; `values["<guarded>"] = ...`; a
direct call of the core's `write_credit` (a ledger row that names no lots: movements go
through ledger/moves.py or ledger/wallet.py).

ALLOWED lists, with the reason, what still writes outside the core. It may only shrink.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "ciris_billing"
CORE = SRC / "ledger"

GUARDED = {
    "free_uses_remaining",
    "paid_uses_remaining",
    "total_uses",
    "last_charge_free_uses",
    "held_uses",
    "reserved_free_uses",
    "reserved_paid_uses",
    "refund_owed_uses",
    "lot_ids",
    "lot_left",
    "lot_kinds",
    "lot_expires",
    "last_lot_uses",
    "next_expiry_at",
    "free_period",
}
LEDGER_TABLES = {"credits", "charges", "lots"}

# module (relative to src/ciris_billing) -> why it may still write. Only shrinks.
ALLOWED: dict[str, str] = {
    # Creates the account row with its counters at 0; the lots then fill them through
    # ledger/wallet.py add_lot. (No uses are written here.)
    "accounts/service.py": "the new account's row, counters 0 (ledger/wallet.py fills them)",
}
# History is migrated by the migrations themselves (they run without the application's code).
SKIPPED_DIRS = ("migrations",)

_SQL_UPDATE = re.compile(r"UPDATE\s+accounts\b(?P<rest>.*?)(?:WHERE|RETURNING|$)", re.I | re.S)
_SQL_INSERT = re.compile(r"INSERT\s+INTO\s+(credits|charges|lots)\b", re.I)


def _names_accounts_update(node: ast.AST) -> bool:
    """The call chain contains `accounts.update()` or an insert into accounts."""
    for inner in ast.walk(node):
        if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute):
            target = inner.func.value
            if (
                inner.func.attr in ("update", "insert")
                and isinstance(target, ast.Name)
                and target.id == "accounts"
            ):
                return True
        if (
            isinstance(inner, ast.Call)
            and _call_name(inner) in ("insert", "insert_or_ignore")
            and inner.args
            and isinstance(inner.args[0], ast.Name)
            and inner.args[0].id == "accounts"
        ):
            return True
    return False


def _call_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _reads_accounts_columns(node: ast.AST) -> bool:
    return any(
        isinstance(inner, ast.Attribute)
        and inner.attr == "c"
        and isinstance(inner.value, ast.Name)
        and inner.value.id == "accounts"
        for inner in ast.walk(node)
    )


def writes_in(source: str) -> list[str]:
    """The balance and ledger writes in one module's source, described."""
    found: list[str] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if (
                name == "values"
                and isinstance(node.func, ast.Attribute)
                and _names_accounts_update(node.func.value)
            ):
                found.extend(
                    f"line {node.lineno}: accounts.{kw.arg} written"
                    for kw in node.keywords
                    if kw.arg in GUARDED
                )
            if name == "write_credit":
                found.append(f"line {node.lineno}: a ledger row written without its lots")
            if name in ("insert", "insert_or_ignore"):
                table = None
                if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                    table = node.func.value.id if not node.args else None
                if node.args and isinstance(node.args[0], ast.Name):
                    table = node.args[0].id
                if table in LEDGER_TABLES:
                    found.append(f"line {node.lineno}: insert into {table}")
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.slice, ast.Constant)
                    and target.slice.value in GUARDED
                ):
                    found.append(f"line {node.lineno}: accounts.{target.slice.value} written")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value in GUARDED
                    and _reads_accounts_columns(value)
                ):
                    found.append(f"line {node.lineno}: accounts.{key.value} written (dict)")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for match in _SQL_UPDATE.finditer(node.value):
                sets = match.group("rest")
                written = sorted(c for c in GUARDED if re.search(rf"\b{c}\s*=", sets))
                found.extend(f"line {node.lineno}: SQL sets accounts.{c}" for c in written)
            found.extend(
                f"line {node.lineno}: SQL inserts into {m.group(1)}"
                for m in _SQL_INSERT.finditer(node.value)
            )
    return found


def _modules() -> list[Path]:
    return sorted(
        path
        for path in SRC.rglob("*.py")
        if CORE not in path.parents and not any(part in SKIPPED_DIRS for part in path.parts)
    )


def test_only_the_money_core_writes_balances_and_ledger_rows() -> None:
    offenders: dict[str, list[str]] = {}
    for path in _modules():
        relative = path.relative_to(SRC).as_posix()
        found = writes_in(path.read_text())
        if found and relative not in ALLOWED:
            offenders[relative] = found
    assert not offenders, (
        "balances and ledger rows are written only by src/ciris_billing/ledger/ (issue 23): "
        f"{offenders}"
    )


def test_the_allow_list_only_names_modules_that_still_write() -> None:
    """An allowed module that no longer writes comes off the list (it only shrinks)."""
    stale = [
        name
        for name in ALLOWED
        if not (SRC / name).exists() or not writes_in((SRC / name).read_text())
    ]
    assert not stale, f"no longer writing balances or ledger rows, remove from ALLOWED: {stale}"


def test_the_scanner_sees_each_kind_of_write() -> None:
    """The detector itself: each form of write is found, reads are not."""
    source = """
from x import accounts, credits, insert_or_ignore
async def f(conn):
    await conn.execute(
        accounts.update().values(paid_uses_remaining=accounts.c.paid_uses_remaining - 1)
    )
    values = {"reserved_free_uses": accounts.c.reserved_free_uses + 1}
    await conn.execute(insert_or_ignore(credits).values(id=1))
    await conn.execute(credits.insert().values(id=1))
    SQL = "UPDATE accounts AS a SET lot_left = x, updated_at = now() WHERE a.id = 1"
    RAW = "INSERT INTO charges (id) VALUES (1)"
    values["refund_owed_uses"] = 2
    await write_credit(conn, account_id="a", kind="grant", currency="USD", paid=1)
    shown = {"free_uses_remaining": row.free_uses_remaining}
    await conn.execute(accounts.update().values(event_sequence=accounts.c.event_sequence + 1))
"""
    found = writes_in(source)
    assert len(found) == 8, found
    assert not any("free_uses_remaining" in line or "event_sequence" in line for line in found)
