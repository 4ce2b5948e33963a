"""The one base of every request body: a field the model does not name is refused (422 naming
it), as Stripe does, instead of being ignored (`{"usses": 5}` charged 1 use; `{"ttl": 5}` on a
hold became 300 s). The OpenAPI schema says so (`additionalProperties: false`).

Text PostgreSQL cannot store (NUL, lone surrogates) is refused before any model sees it, by the
edge's strict JSON parser (edge.loads_strict) and its checks of paths, queries and forms.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestBody(BaseModel):
    """A request body: unknown fields are an error (extra="forbid")."""

    model_config = ConfigDict(extra="forbid")
