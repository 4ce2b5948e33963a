"""HTTP routes for an account's portal links (write key): make a link that may change the
account (auto top-up, saved card), and revoke every link made so far."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.accounts import service as accounts
from ciris_billing.accounts.answers import portal_link
from ciris_billing.accounts.routes import path_identity
from ciris_billing.db import iso, utcnow
from ciris_billing.deps import (
    IdempotencyKeyHeader,
    StateDep,
    UnitOfWorkDep,
    WriteKey,
    run_idempotent,
)
from ciris_billing.errors import error_responses
from ciris_billing.observability import log
from ciris_billing.portal.links import revoke_links

router = APIRouter(prefix="/v1/billing", tags=["portal"])

PATH = "/accounts/{oauth_provider}/{external_id}"


@router.post(
    f"{PATH}/portal_link", status_code=201, responses=error_responses(401, 403, 404, 409, 422)
)
async def make_portal_link(
    oauth_provider: str,
    external_id: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """A portal link that may also switch auto top-up and remove the saved card (a credit
    check by a read key answers a link that only shows). Lasts PORTAL_LINK_SECONDS."""
    identity = path_identity(oauth_provider, external_id)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        await accounts.get_account(conn, identity)  # 404 when unknown
        expires = utcnow() + timedelta(seconds=state.settings.portal_link_seconds)
        url = portal_link(state, request, identity, "write")
        return 201, {"portal_url": url, "scope": "write", "expires_at": iso(expires)}

    key = idempotency.resolve_key(idempotency_key)
    return await run_idempotent(request, work, principal, key, {}, effect)


@router.post(f"{PATH}/portal_links/revoke", responses=error_responses(401, 403, 404, 409, 422))
async def revoke_portal_links(
    oauth_provider: str,
    external_id: str,
    request: Request,
    work: UnitOfWorkDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Every portal link of the account made until now stops working (404); links made later
    (the next check's) work."""
    identity = path_identity(oauth_provider, external_id)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        account = await accounts.get_account(conn, identity)
        revoked_at = await revoke_links(conn, account.id)
        log.info("portal_links_revoked", account_id=account.id)
        return 200, {"account_id": account.id, "revoked_at": iso(revoked_at)}

    key = idempotency.resolve_key(idempotency_key)
    return await run_idempotent(request, work, principal, key, {}, effect)
