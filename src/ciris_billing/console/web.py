"""What every console route needs: its session, its form, its CSRF check, its answers."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Request
from fastapi.responses import Response

from ciris_billing.console.sessions import COOKIE_PATH, SESSION_COOKIE, Session, current, same_token
from ciris_billing.deps import AppState
from ciris_billing.errors import BillingError, CsrfRefused, InvalidRequest
from ciris_billing.unit_of_work import UnitOfWork
from ciris_billing.web.templating import PAGE_HEADERS, render

LOGIN_PATH = "/console/login"
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FIELDS = 40


async def session_of(request: Request, state: AppState, work: UnitOfWork) -> Session | None:
    return await current(
        await work.connection(), request.cookies.get(SESSION_COOKIE), state.settings
    )


def to_login() -> Response:
    """Back to the login form (no session, or it ended)."""
    return Response(status_code=303, headers={"Location": LOGIN_PATH, **PAGE_HEADERS})


def redirect(path: str, **query: str | None) -> Response:
    kept = {k: v for k, v in query.items() if v}
    location = f"{path}?{urlencode(kept)}" if kept else path
    return Response(status_code=303, headers={"Location": location, **PAGE_HEADERS})


async def form_of(request: Request) -> dict[str, str]:
    """A posted form (urlencoded, as browsers send it without files): the first value of each
    field. Anything else is bad input (422)."""
    body = await request.body()
    if not body:
        return {}  # a form with no field (a lone button)
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != FORM_TYPE:
        raise InvalidRequest("Send the form as application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("The form could not be read") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if "\x00" in name or "\x00" in value:  # %00: no column can store it (as edge.py)
            raise InvalidRequest("The form holds a NUL character (%00), which cannot be stored")
        fields.setdefault(name, value)
    return fields


def check_csrf(session: Session, form: dict[str, str]) -> None:
    if not same_token(session.csrf_token, form.get("csrf_token")):
        raise CsrfRefused("This form has no valid CSRF token: reload the page and try again")


def problem(
    error: BillingError, session: Session | None, back: str | None = None, title: str = ""
) -> Response:
    """An error as a page of its own (its status code, its message, a way back)."""
    return render(
        "console_problem.html",
        status_code=error.status_code,
        session=session,
        title=title or "That did not work",
        message=error.detail,
        code=error.code,
        back=back,
    )


def session_cookie(
    response: Response, request: Request, state: AppState, token: str, max_age: int
) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request, state),
    )


def is_https(request: Request, state: AppState) -> bool:
    """Served over https: the request says so, or the service's public address is https (a
    proxy in front terminates TLS and forwards plain http)."""
    public = state.settings.public_base_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


def page(template: str, session: Session, **context: Any) -> Response:
    return render(template, session=session, **context)
