"""Request and response bodies for rates."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictInt, StringConstraints

from ciris_billing.request_body import RequestBody

# A feature's name: lower-case letters, digits and _ . : - (e.g. `gpt-4o-tokens`).
Feature = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.:-]{0,63}$"),
    Field(description="What is metered, e.g. `gpt-4o-tokens`", examples=["gpt-4o-tokens"]),
]
MAX_UNITS_PER_USE = 1_000_000_000_000


class RateSet(RequestBody):
    feature: Feature
    units_per_use: StrictInt = Field(
        ge=1, le=MAX_UNITS_PER_USE, description="This many units of the feature make one use"
    )
    rounding: Literal["up", "carry"] = Field(
        description="`up`: each request rounds up by itself; `carry`: the account keeps the "
        "remainder per feature for its next request"
    )


class RateOut(BaseModel):
    feature: str
    units_per_use: int
    rounding: Literal["up", "carry"]
    created_at: str
    updated_at: str


class RatesOut(BaseModel):
    rates: list[RateOut]
