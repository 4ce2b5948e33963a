"""Issue 23 item 6, the portal's twin: the balance area says how many uses expire next and
when ("5 uses expire on 12 Jan 2099"), and nothing when nothing expires."""

from __future__ import annotations

from tests.portal.test_portal import portal_of
from tests.support.api import Api, identity

CAROL = identity("carol-lots@example.com")


async def test_the_portal_names_the_soonest_expiry(api: Api) -> None:
    page = await api.http.get(await portal_of(api, CAROL))
    assert page.status_code == 200
    assert 'id="next-expiry"' not in page.text  # the free uses never expire
    for uses, when in ((5, "2099-01-12T00:00:00Z"), (2, "2099-03-01T00:00:00Z")):
        granted = await api.post(
            "/v1/billing/credits",
            {**CAROL, "uses": uses, "reason": "promo", "expires_at": when},
            scope="admin",
        )
        assert granted.status_code == 201, granted.text
    page = await api.http.get(await portal_of(api, CAROL))
    assert "5 uses expire on 12 Jan 2099." in page.text
    lot_id = granted.json()["lot_id"]
    first = (
        await api.get(f"/v1/billing/accounts/{CAROL['oauth_provider']}/{CAROL['external_id']}/lots")
    ).json()
    soonest = next(lot["lot_id"] for lot in first["lots"] if lot["uses_granted"] == 5)
    assert (
        await api.post(f"/v1/billing/lots/{soonest}/void", {}, scope="admin")
    ).status_code == 200
    page = await api.http.get(await portal_of(api, CAROL))
    assert "2 uses expire on 1 Mar 2099." in page.text
    assert (await api.post(f"/v1/billing/lots/{lot_id}/void", {}, scope="admin")).status_code == 200
    page = await api.http.get(await portal_of(api, CAROL))
    assert 'id="next-expiry"' not in page.text
    assert (await api.audit()).clean
