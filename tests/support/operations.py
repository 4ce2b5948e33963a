"""Every operation the app serves, read from its OpenAPI document (for tests that visit them
all: pathological bodies, log contents)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ciris_billing.app import create_app
from tests.support.api import UNUSED_DATABASE_URL, make_settings


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    needs_key: bool
    takes_json: bool

    @property
    def path(self) -> str:
        return re.sub(
            r"\{(\w+)\}",
            lambda m: {"oauth_provider": "oauth:google", "provider_name": "sandbox"}.get(
                m.group(1), "fuzz@example.com"
            ),
            self.template,
        )


def operations() -> list[Operation]:
    """Every operation the app serves, from its OpenAPI document."""
    document = create_app(make_settings(UNUSED_DATABASE_URL)).openapi()
    found = []
    for template, methods in document["paths"].items():
        for method, operation in methods.items():
            content = operation.get("requestBody", {}).get("content", {})
            found.append(
                Operation(
                    method.upper(),
                    template,
                    needs_key=bool(operation.get("security")),
                    takes_json="application/json" in content,
                )
            )
    return found


OPERATIONS = operations()
