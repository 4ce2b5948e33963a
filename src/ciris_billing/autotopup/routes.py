"""HTTP routes for an account's auto top-up: show (read), switch on or off (write), remove the
saved card (write; switches it off)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.accounts import service as accounts
from ciris_billing.accounts.routes import path_identity
from ciris_billing.autotopup import cards
from ciris_billing.autotopup.schemas import AutoTopupOut, AutoTopupUpdate
from ciris_billing.autotopup.topups import month_start
from ciris_billing.config import Settings
from ciris_billing.db import auto_topups, utcnow
from ciris_billing.deps import (
    IdempotencyKeyHeader,
    ReadKey,
    StateDep,
    UnitOfWorkDep,
    WriteKey,
    json_response,
    replay_if_known,
    run_idempotent,
)
from ciris_billing.errors import error_responses
from ciris_billing.events.outbox import threshold_of
from ciris_billing.pricing import Pricing

router = APIRouter(prefix="/v1/billing", tags=["auto top-up"])

PATH = "/accounts/{oauth_provider}/{external_id}/auto_topup"
OauthProvider = Annotated[str, Path(examples=["oauth:google"])]
ExternalId = Annotated[str, Path(examples=["user@example.com"])]


async def auto_topup_body(
    conn: AsyncConnection, pricing: Pricing, settings: Settings, account: Any
) -> dict[str, Any]:
    """The account's auto top-up as the API and the CLI show it."""
    found = await cards.settings_of(conn, account.id)
    this_month = await conn.scalar(
        select(func.count())
        .select_from(auto_topups)
        .where(
            auto_topups.c.account_id == account.id,
            auto_topups.c.created_at >= month_start(utcnow()),
            auto_topups.c.status != "skipped",
        )
    )
    return AutoTopupOut(
        oauth_provider=account.oauth_provider,
        external_id=account.external_id,
        enabled=bool(found is not None and found.enabled),
        card_saved=bool(found is not None and found.payment_method_id),
        card_brand=found.card_brand if found is not None else None,
        card_last4=found.card_last4 if found is not None else None,
        uses_per_topup=pricing.paid_uses_per_purchase,
        amount_minor=pricing.price_per_purchase_minor,
        currency=pricing.currency,
        threshold_uses=await threshold_of(conn, account.id),
        max_per_month=settings.auto_topup_max_per_month,
        topups_this_month=int(this_month or 0),
        consecutive_failures=int(found.consecutive_failures) if found is not None else 0,
        disabled_reason=found.disabled_reason if found is not None else None,
    ).model_dump(mode="json")


@router.get(PATH, response_model=AutoTopupOut, responses=error_responses(401, 403, 404, 422))
async def get_auto_topup(
    oauth_provider: OauthProvider,
    external_id: ExternalId,
    state: StateDep,
    work: UnitOfWorkDep,
    _key: ReadKey,
) -> Response:
    """The account's auto top-up: on or off, the saved card (brand, last 4), this month's
    count against the cap."""
    conn = await work.connection()
    account = await accounts.get_account(conn, path_identity(oauth_provider, external_id))
    return json_response(200, await auto_topup_body(conn, state.pricing, state.settings, account))


@router.put(PATH, response_model=AutoTopupOut, responses=error_responses(401, 403, 404, 409, 422))
async def put_auto_topup(
    oauth_provider: OauthProvider,
    external_id: ExternalId,
    body: AutoTopupUpdate,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Switch auto top-up on (409 auto_topup_needs_card without a saved card) or off.
    Idempotent: the same body gives the same state (switching on what is on changes nothing)."""
    identity = path_identity(oauth_provider, external_id)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        account = await accounts.get_account(conn, identity)
        await cards.set_enabled(conn, account.id, body.enabled)
        return 200, await auto_topup_body(conn, state.pricing, state.settings, account)

    key = idempotency.resolve_key(idempotency_key)
    payload = body.model_dump(mode="json")
    return await run_idempotent(request, work, principal, key, payload, effect)


@router.delete(
    PATH, response_model=AutoTopupOut, responses=error_responses(401, 403, 404, 409, 422, 502, 503)
)
async def delete_auto_topup(
    oauth_provider: OauthProvider,
    external_id: ExternalId,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Remove the saved card (the provider forgets it too); auto top-up is switched off."""
    key = idempotency.resolve_key(idempotency_key)
    replay = await replay_if_known(request, work, principal, key, {})
    if replay is not None:
        return replay
    identity = path_identity(oauth_provider, external_id)
    account = await accounts.get_account(await work.connection(), identity)
    # Removing again is harmless (remove_card finishes or finds nothing): a retry racing its
    # twin before either recorded its answer may ask the provider twice, never charge.
    await cards.remove_card(work, state.provider, account.id)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        return 200, await auto_topup_body(conn, state.pricing, state.settings, account)

    return await run_idempotent(request, work, principal, key, {}, effect)
