"""Issue 21, finding 9: an IPv6 form of a refused address is refused like the address itself.

`https://[2002:7f00:1::1]/x` (6to4 of 127.0.0.1) was accepted as a webhook endpoint. The
tunnelling and translation prefixes (6to4, Teredo, NAT64) are refused whatever they carry, and
the IPv4 written as IPv6 by the host (mapped, compatible, translated) is judged by its IPv4
address. Each form is tried as a URL literal, and as what a host name resolves to (the check
made after DNS, at creation and again at every delivery).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from ciris_billing.errors import WebhookUrlRefused
from ciris_billing.events import ssrf
from tests.support.api import Api

BASE = "/v1/billing/webhook_endpoints"

# Every IPv6 form tried: (address, what it is).
REFUSED_IPV6 = [
    ("2002:7f00:1::1", "6to4 of 127.0.0.1 (the attack)"),
    ("2002:7F00:0001:0000::1", "6to4 of 127.0.0.1, upper case and zeros written"),
    ("2002:a9fe:a9fe::", "6to4 of 169.254.169.254 (cloud metadata)"),
    ("2002:a00:1::1", "6to4 of 10.0.0.1 (private)"),
    ("2002:c0a8:1::1", "6to4 of 192.168.0.1 (private)"),
    ("2002:808:808::1", "6to4 of 8.8.8.8: through a relay we do not control"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo, client 127.0.0.1"),
    ("2001:0:4136:e378:8000:63bf:5601:5601", "Teredo, client 169.254.169.254"),
    ("2001::1", "Teredo prefix"),
    ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254"),
    ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
    ("64:ff9b::808:808", "NAT64 of 8.8.8.8: the gateway is in our own network"),
    ("64:ff9b:1::7f00:1", "local-use NAT64 of 127.0.0.1"),
    ("64:ff9b:1:ffff::a9fe:a9fe", "local-use NAT64 of 169.254.169.254"),
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1"),
    ("::ffff:7f00:1", "IPv4-mapped 127.0.0.1, hex"),
    ("0:0:0:0:0:ffff:7f00:1", "IPv4-mapped 127.0.0.1, written out"),
    ("::ffff:169.254.169.254", "IPv4-mapped cloud metadata"),
    ("::ffff:10.0.0.1", "IPv4-mapped private"),
    ("::ffff:100.100.100.200", "IPv4-mapped shared address space"),
    ("::127.0.0.1", "IPv4-compatible 127.0.0.1"),
    ("::169.254.169.254", "IPv4-compatible cloud metadata"),
    ("::ffff:0:127.0.0.1", "IPv4-translated (SIIT) 127.0.0.1"),
    ("::ffff:0:a9fe:a9fe", "IPv4-translated cloud metadata"),
    ("::1", "IPv6 loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fd00:ec2::254", "unique local (AWS metadata over IPv6)"),
]
# IPv4 written in the forms a resolver's inet_aton accepts (resolved offline).
REFUSED_IPV4_URLS = [
    "https://2130706433/x",  # 127.0.0.1 as one decimal number
    "https://0x7f000001/x",  # as hex
    "https://0177.0.0.1/x",  # octal
    "https://127.1/x",  # short form
]
ACCEPTED_IPV6 = [
    "2606:2800:21f:cb07:6820:80da:af6b:8b2c",  # a global unicast address
    "::ffff:93.184.215.14",  # a public IPv4, mapped
]


def literal_url(address: str) -> str:
    return f"https://[{address}]/x"


@pytest.mark.parametrize(("address", "form"), REFUSED_IPV6, ids=[a for a, _ in REFUSED_IPV6])
async def test_finding09_ipv6_forms_of_refused_addresses_are_refused(
    api: Api, address: str, form: str
) -> None:
    response = await api.post(BASE, {"url": literal_url(address)}, scope="admin")
    assert response.status_code == 422, f"{form}: {response.text}"
    assert response.json()["error"] == "webhook_url_refused"
    assert (await api.get(BASE, scope="admin")).json()["data"] == []


@pytest.mark.parametrize("url", REFUSED_IPV4_URLS)
async def test_finding09_ipv4_notations_of_loopback_are_refused(api: Api, url: str) -> None:
    response = await api.post(BASE, {"url": url}, scope="admin")
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "webhook_url_refused"


def resolving_to(address: str) -> Any:
    """A getaddrinfo that answers `address` for the test's host name (as a DNS record would)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example.test":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0))]
        return real(host, port, *args, **kwargs)

    return getaddrinfo


@pytest.mark.parametrize(("address", "form"), REFUSED_IPV6, ids=[a for a, _ in REFUSED_IPV6])
async def test_finding09_a_name_resolving_to_a_refused_form_is_refused(
    api: Api, monkeypatch: pytest.MonkeyPatch, address: str, form: str
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", resolving_to(address))
    url = "https://hooks.example.test/x"
    # At delivery: the check made after DNS, each time.
    with pytest.raises(WebhookUrlRefused):
        await ssrf.safe_target(url, allow_private=False)
    # At creation.
    response = await api.post(BASE, {"url": url}, scope="admin")
    assert response.status_code == 422, f"{form}: {response.text}"
    assert response.json()["error"] == "webhook_url_refused"


@pytest.mark.parametrize("address", ACCEPTED_IPV6)
async def test_finding09_public_addresses_still_accepted(
    api: Api, monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", resolving_to(address))
    target = await ssrf.safe_target("https://hooks.example.test/x", allow_private=False)
    assert target.server_name == "hooks.example.test"
    response = await api.post(BASE, {"url": literal_url(address)}, scope="admin")
    assert response.status_code == 201, response.text
