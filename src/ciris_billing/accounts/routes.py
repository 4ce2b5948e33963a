"""HTTP routes for accounts, credit checks, charges and the ledger. Thin: parse, call, render."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.accounts import answers, service
from ciris_billing.accounts.schemas import (
    AccountCreate,
    AccountOut,
    ChargeCreate,
    ChargeOut,
    CreditCheck,
    CreditCheckOut,
    IdentityFields,
    PurchaseRequiredOut,
    TransactionsOut,
)
from ciris_billing.db import iso
from ciris_billing.deps import (
    IdempotencyKeyHeader,
    ReadKey,
    StateDep,
    UnitOfWorkDep,
    WriteKey,
    json_response,
    run_idempotent,
)
from ciris_billing.errors import ErrorOut, InvalidRequest, ScopeMissing, error_responses
from ciris_billing.observability import ACCOUNTS_CREATED, log

router = APIRouter(prefix="/v1/billing", tags=["billing"])

ERRORS = error_responses(401, 403, 422)


def account_body(row: Row[Any]) -> dict[str, Any]:
    return {
        "account_id": row.id,
        "oauth_provider": row.oauth_provider,
        "external_id": row.external_id,
        "customer_email": row.customer_email,
        "display_name": row.display_name,
        "plan_name": row.plan_name,
        "currency": row.currency,
        "status": row.status,
        "balance_minor": int(row.paid_uses_remaining),
        "credits_remaining": int(row.paid_uses_remaining),
        "free_uses_remaining": int(row.free_uses_remaining),
        "total_uses": int(row.total_uses),
        # Uses held by active reservations (free/credits_remaining are what is available).
        "held_uses": int(row.reserved_free_uses) + int(row.reserved_paid_uses),
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def path_identity(oauth_provider: str, external_id: str) -> service.Identity:
    try:
        fields = IdentityFields(oauth_provider=oauth_provider, external_id=external_id)
    except ValidationError as exc:
        raise InvalidRequest(
            "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors())
        ) from None
    return service.Identity(fields.oauth_provider, fields.external_id)


def identity_of(body: IdentityFields) -> service.Identity:
    return service.Identity(body.oauth_provider, body.external_id)


@router.post(
    "/accounts",
    response_model=AccountOut,
    status_code=201,
    responses={
        200: {"model": AccountOut, "description": "The account already existed"},
        **ERRORS,
        **error_responses(409),
    },
)
async def create_account(
    body: AccountCreate,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Get or create an account; a new one starts with the free uses (and any initial balance:
    paid uses above zero are a grant, so they need an admin key)."""
    if body.initial_balance_minor > 0 and not principal.allows("admin"):
        raise ScopeMissing(
            "initial_balance_minor above zero grants paid uses: it needs an API key with the "
            "'admin' scope"
        )
    key = idempotency.resolve_key(idempotency_key)
    new = service.NewAccount(
        initial_paid_uses=body.initial_balance_minor,
        currency=body.currency,
        plan_name=body.plan_name,
        customer_email=body.customer_email,
        display_name=body.display_name,
    )

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        row, created = await service.ensure_account(conn, identity_of(body), state.pricing, new)
        if created:
            ACCOUNTS_CREATED.inc()
            log.info("account_created", account_id=row.id, oauth_provider=row.oauth_provider)
        return (201 if created else 200), account_body(row)

    payload = body.model_dump(mode="json")
    return await run_idempotent(request, work, principal, key, payload, effect)


@router.get(
    "/accounts/{oauth_provider}/{external_id}",
    response_model=AccountOut,
    responses={404: {"model": ErrorOut}, **ERRORS},
)
async def get_account(
    oauth_provider: Annotated[str, Path(examples=["oauth:google"])],
    external_id: Annotated[str, Path(examples=["user@example.com"])],
    work: UnitOfWorkDep,
    _key: ReadKey,
) -> Response:
    """An account's balances and details."""
    identity = path_identity(oauth_provider, external_id)
    row = await service.get_account(await work.connection(), identity)
    return json_response(200, account_body(row))


@router.post(
    "/credits/check",
    response_model=CreditCheckOut,
    response_model_exclude_unset=True,
    responses=ERRORS,
)
async def check_credit(
    body: CreditCheck, request: Request, state: StateDep, _key: ReadKey
) -> Response:
    """May this user go on? Creates the account (with its free uses) on first sight."""
    # Answered by answers.py, as on the fast path (hot/asgi.py), which checks at start-up that
    # this route's dependencies are the ones it implements.
    return await answers.check(state, request, body, may_write=_key.allows("write"))


@router.post(
    "/charges",
    response_model=ChargeOut,
    status_code=201,
    responses={
        402: {"model": PurchaseRequiredOut, "description": "No use left: a purchase is required"},
        409: {"model": ErrorOut, "description": "Idempotency key reused for another request"},
        **ERRORS,
    },
)
async def create_charge(
    body: ChargeCreate,
    request: Request,
    state: StateDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Record a use: free uses first, then paid ones. 402 when none is left; never below zero."""
    return await answers.charge(state, request, body, idempotency_key, principal)


@router.get(
    "/transactions", response_model=TransactionsOut, responses={404: {"model": ErrorOut}, **ERRORS}
)
async def list_transactions(
    work: UnitOfWorkDep,
    _key: ReadKey,
    oauth_provider: Annotated[str, Query(examples=["oauth:google"])],
    external_id: Annotated[str, Query(examples=["user@example.com"])],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Response:
    """The account's ledger (charges and credits), newest first, paginated with limit/offset."""
    identity = path_identity(oauth_provider, external_id)
    conn = await work.connection()
    account = await service.get_account(conn, identity)
    rows, total = await service.list_transactions(conn, account.id, limit=limit, offset=offset)
    items = [
        {
            "transaction_id": row.transaction_id,
            "type": row.type,
            "kind": row.kind,
            "free_uses_delta": int(row.free_uses_delta),
            "paid_uses_delta": int(row.paid_uses_delta),
            "amount_minor": int(row.amount_minor),
            "currency": row.currency,
            "description": row.description,
            "external_transaction_id": row.external_transaction_id,
            "created_at": iso(row.created_at),
        }
        for row in rows
    ]
    return json_response(
        200,
        {
            "account_id": account.id,
            "transactions": items,
            "total": total,
            "limit": limit,
            "offset": offset,
            "has_more": offset + len(items) < total,
        },
    )
