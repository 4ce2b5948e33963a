"""HTTP routes for an account's portal links (write key): make a link that may change the
account (auto top-up, saved card), and revoke every link made so far."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ciris_billing.accounts import service as accounts
from ciris_billing.accounts.answers import portal_link
from ciris_billing.accounts.routes import path_identity
from ciris_billing.db import iso, utcnow
from ciris_billing.deps import StateDep, UnitOfWorkDep, WriteKey, json_response
from ciris_billing.errors import error_responses
from ciris_billing.observability import log
from ciris_billing.portal.links import revoke_links

router = APIRouter(prefix="/v1/billing", tags=["portal"])

PATH = "/accounts/{oauth_provider}/{external_id}"


@router.post(f"{PATH}/portal_link", status_code=201, responses=error_responses(401, 403, 404, 422))
async def make_portal_link(
    oauth_provider: str,
    external_id: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    _key: WriteKey,
) -> Response:
    """A portal link that may also switch auto top-up and remove the saved card (a credit
    check by a read key answers a link that only shows). Lasts PORTAL_LINK_SECONDS."""
    identity = path_identity(oauth_provider, external_id)
    await accounts.get_account(await work.connection(), identity)  # 404 when unknown
    expires = utcnow() + timedelta(seconds=state.settings.portal_link_seconds)
    url = portal_link(state, request, identity, "write")
    return json_response(201, {"portal_url": url, "scope": "write", "expires_at": iso(expires)})


@router.post(f"{PATH}/portal_links/revoke", responses=error_responses(401, 403, 404, 422))
async def revoke_portal_links(
    oauth_provider: str, external_id: str, work: UnitOfWorkDep, _key: WriteKey
) -> Response:
    """Every portal link of the account made until now stops working (404); links made later
    (the next check's) work."""
    identity = path_identity(oauth_provider, external_id)
    conn = await work.connection()
    account = await accounts.get_account(conn, identity)
    revoked_at = await revoke_links(conn, account.id)
    log.info("portal_links_revoked", account_id=account.id)
    return json_response(200, {"account_id": account.id, "revoked_at": iso(revoked_at)})
