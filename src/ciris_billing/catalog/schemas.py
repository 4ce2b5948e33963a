"""Request and response bodies of the catalog's routes (packs, plans, promotion codes)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StringConstraints

from ciris_billing.accounts.schemas import MAX_MINOR, Currency
from ciris_billing.request_body import RequestBody

PackId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
PlanName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]
Code = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[^\x00]*$")]
PackIds = Annotated[list[PackId], Field(max_length=100)]
MAX_USES = 100_000_000
MAX_DAYS = 3_650


class PackCreate(RequestBody):
    pack_id: PackId
    name: Name
    uses: StrictInt = Field(ge=1, le=MAX_USES)
    price_minor: StrictInt = Field(ge=1, le=MAX_MINOR)
    currency: Currency
    expires_in_days: StrictInt | None = Field(default=None, ge=1, le=MAX_DAYS)
    active: StrictBool = True


class PackUpdate(RequestBody):
    """What a PATCH may change (its currency never: purchases and codes depend on it)."""

    name: Name | None = None
    uses: StrictInt | None = Field(default=None, ge=1, le=MAX_USES)
    price_minor: StrictInt | None = Field(default=None, ge=1, le=MAX_MINOR)
    expires_in_days: StrictInt | None = Field(default=None, ge=1, le=MAX_DAYS)
    active: StrictBool | None = None


class PackOut(BaseModel):
    pack_id: str
    name: str
    uses: int
    price_minor: int
    currency: str
    expires_in_days: int | None
    active: bool


class PacksOut(BaseModel):
    packs: list[PackOut]


class PlanCreate(RequestBody):
    name: PlanName
    free_uses: StrictInt = Field(ge=0, le=MAX_USES)
    free_uses_reset: Literal["never", "monthly"] = "never"
    pack_ids: PackIds | None = Field(default=None, description="None: every active pack")
    low_balance_threshold_uses: StrictInt | None = Field(default=None, ge=0, le=MAX_USES)


class PlanUpdate(RequestBody):
    free_uses: StrictInt | None = Field(default=None, ge=0, le=MAX_USES)
    free_uses_reset: Literal["never", "monthly"] | None = None
    pack_ids: PackIds | None = None
    low_balance_threshold_uses: StrictInt | None = Field(default=None, ge=0, le=MAX_USES)


class PlanOut(BaseModel):
    name: str
    free_uses: int
    free_uses_reset: str
    pack_ids: list[str] | None
    low_balance_threshold_uses: int | None


class PlansOut(BaseModel):
    plans: list[PlanOut]


class AccountPlanChange(RequestBody):
    plan_name: PlanName


class PromotionCodeCreate(RequestBody):
    code: Code
    percent_off: StrictInt | None = Field(default=None, ge=1, le=100)
    amount_off_minor: StrictInt | None = Field(default=None, ge=1, le=MAX_MINOR)
    pack_ids: PackIds | None = None
    max_redemptions: StrictInt | None = Field(default=None, ge=1, le=MAX_USES)
    once_per_account: StrictBool = False
    expires_at: datetime | None = None
    active: StrictBool = True


class PromotionCodeUpdate(RequestBody):
    active: StrictBool | None = None
    max_redemptions: StrictInt | None = Field(default=None, ge=1, le=MAX_USES)
    expires_at: datetime | None = None


class PromotionCodeOut(BaseModel):
    code: str
    percent_off: int | None
    amount_off_minor: int | None
    pack_ids: list[str] | None
    max_redemptions: int | None
    redemptions: int
    once_per_account: bool
    expires_at: str | None
    active: bool


class PromotionCodesOut(BaseModel):
    promotion_codes: list[PromotionCodeOut]
