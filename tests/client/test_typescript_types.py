"""The TypeScript client's types are written by hand (clients/typescript/src/index.d.ts); each
API shape there names its schema (`/** @schema ChargeOut */`) and must say what /openapi.json
says of it: the same fields, the same optional ones, the same types. A field added to the API
without the client's types (or the other way round) fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.client.test_openapi_client import served_spec

TYPES = Path(__file__).resolve().parents[2] / "clients" / "typescript" / "src" / "index.d.ts"
INTERFACE = re.compile(
    r"/\*\* @schema (\w+) \*/\s*export interface (\w+)(?: extends (\w+))? \{(.*?)\n\}", re.S
)
FIELD = re.compile(r"^\s*(\w+)(\??): (.+);$")
PRIMITIVES = {
    "integer": "number",
    "number": "number",
    "string": "string",
    "boolean": "boolean",
    "null": "null",
    "object": "Record<string, unknown>",
}


def ts_type(schema: dict[str, Any]) -> str:
    """How index.d.ts writes a JSON schema's type."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(ts_type(option) for option in schema["anyOf"])
    if "const" in schema:
        return f'"{schema["const"]}"'
    if "enum" in schema:
        return " | ".join(f'"{value}"' for value in schema["enum"])
    kind = str(schema.get("type"))
    if kind == "array":
        return f"{ts_type(schema['items'])}[]"
    return PRIMITIVES[kind]


def declared() -> dict[str, tuple[str, dict[str, tuple[bool, str]]]]:
    """schema name -> (interface name, field -> (optional, type)), inherited fields included."""
    by_interface: dict[str, dict[str, tuple[bool, str]]] = {}
    found: dict[str, tuple[str, dict[str, tuple[bool, str]]]] = {}
    for schema, interface, parent, body in INTERFACE.findall(TYPES.read_text()):
        fields = dict(by_interface[parent]) if parent else {}
        for line in body.splitlines():
            match = FIELD.match(line)
            if match:
                fields[match.group(1)] = (match.group(2) == "?", match.group(3))
        by_interface[interface] = fields
        found[schema] = (interface, fields)
    return found


def test_every_api_shape_in_the_typescript_types_matches_openapi() -> None:
    schemas = served_spec()["components"]["schemas"]
    shapes = declared()
    # The shapes the client returns and raises, at least.
    assert {
        "CreditCheckOut",
        "ChargeOut",
        "PurchaseOut",
        "ReservationOut",
        "ReservationCaptureOut",
        "ReservationsOut",
        "TransactionsOut",
        "ErrorOut",
        "PurchaseRequiredOut",
    } <= shapes.keys()
    for name, (_interface, fields) in shapes.items():
        schema = schemas[name]
        required = set(schema.get("required", []))
        expected = {
            field: (field not in required, ts_type(prop))
            for field, prop in schema["properties"].items()
        }
        assert fields == expected, name


def test_the_comparison_notices_a_drift() -> None:
    # The check itself works: a schema with a field the types lack does not compare equal.
    fields = declared()["ChargeOut"][1]
    assert "charge_id" in fields
    assert fields != {**fields, "new_field": (False, "string")}
    assert ts_type({"anyOf": [{"type": "integer"}, {"type": "null"}]}) == "number | null"
