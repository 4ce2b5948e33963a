"""The SSRF guard: webhook URLs may not reach this service's own network.

An endpoint URL is refused (at creation, and again at every delivery, after DNS) when any
address its host resolves to is loopback, private, link-local (cloud metadata services live at
169.254.169.254), shared (100.64/10, Alibaba's metadata), multicast, reserved or unspecified —
in short anything that is not a global unicast address — including IPv4 addresses written as
IPv6: mapped (::ffff:127.0.0.1), compatible (::127.0.0.1) and translated (::ffff:0:127.0.0.1)
forms are judged by the IPv4 address they carry. The tunnelling and translation prefixes are
refused whatever they carry: 6to4 (2002::/16), Teredo (2001::/32) and NAT64 (64:ff9b::/96,
64:ff9b:1::/48) each reach an IPv4 address through a relay or gateway we do not control (a
NAT64 gateway sits in the service's own network: 64:ff9b::7f00:1 is its loopback). https is
required. ALLOW_PRIVATE_WEBHOOK_URLS=true lifts both rules
(development, tests).

Checking the name is not enough: DNS may answer differently a moment later (rebinding). So a
delivery connects to the very address that was checked (`Target.address`), naming the host in
the Host header and in TLS (SNI and certificate check), never resolving it a second time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

from ciris_billing.errors import WebhookUrlRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_LENGTH = 2048


@dataclass(frozen=True, slots=True)
class Target:
    """Where one delivery goes: the URL to request (its host the checked address), and the
    Host header and TLS server name that still name the endpoint's host (None: as in url)."""

    url: str
    host_header: str | None = None
    server_name: str | None = None


def check_url(url: str, *, allow_private: bool) -> SplitResult:
    """The URL's parts, if its form is acceptable (scheme, host, no credentials); else
    WebhookUrlRefused. Says nothing yet of where the host resolves."""
    if len(url) > MAX_URL_LENGTH or not url.isascii() or not url.isprintable():
        raise WebhookUrlRefused("url: an absolute http(s) URL of at most 2048 ASCII characters")
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number: ValueError
    except ValueError as exc:
        raise WebhookUrlRefused("url: not a valid URL") from exc
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in allowed:
        raise WebhookUrlRefused(
            "url: must be https (http only with ALLOW_PRIVATE_WEBHOOK_URLS=true)"
        )
    if not parts.hostname:
        raise WebhookUrlRefused("url: has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlRefused("url: credentials in the URL are not accepted")
    if parts.fragment:
        raise WebhookUrlRefused("url: a fragment (#...) is not sent; remove it")
    return parts


# Prefixes whose addresses carry an IPv4 address another host turns into a connection to it.
TUNNELS = (
    ("6to4", ipaddress.IPv6Network("2002::/16")),
    ("Teredo", ipaddress.IPv6Network("2001::/32")),
    ("NAT64", ipaddress.IPv6Network("64:ff9b::/96")),
    ("NAT64", ipaddress.IPv6Network("64:ff9b:1::/48")),
)
# IPv4 addresses written as IPv6: compatible (::a.b.c.d, deprecated) and translated
# (::ffff:0:a.b.c.d, SIIT); mapped (::ffff:a.b.c.d) is IPv6Address.ipv4_mapped.
EMBEDDING = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("::ffff:0:0:0/96"))


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a compatible or translated IPv6 address stands for."""
    if any(address in network for network in EMBEDDING):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress) -> str | None:
    """Why this address may not be a webhook's destination (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address):
        for name, network in TUNNELS:
            if address in network:
                return f"{name} ({network})"
        if address.ipv4_mapped is not None:  # a socket connects to the IPv4 address itself
            return refusal(address.ipv4_mapped)
        ipv4 = embedded_ipv4(address)
        if ipv4 is not None and not (address.is_loopback or address.is_unspecified):
            why = refusal(ipv4)
            if why is not None:
                return why  # else still refused below, as reserved (::/8)
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata)"
    if address.is_private:
        return "private"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "not unicast"
    if not address.is_global:
        return "not global"
    return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal: itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        answers = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlRefused(f"url: the host {host} does not resolve") from exc
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in answers:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise WebhookUrlRefused(f"url: the host {host} does not resolve")
    return found


async def safe_target(url: str, *, allow_private: bool) -> Target:
    """Where to send a request for `url`, after DNS: refused (WebhookUrlRefused) when any of
    its addresses is not public, unless allow_private. The target names the checked address."""
    parts = check_url(url, allow_private=allow_private)
    if allow_private:
        return Target(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = await resolve(host, port)
    for address in addresses:
        why = refusal(address)
        if why is not None:
            raise WebhookUrlRefused(
                f"url: {host} resolves to a {why} address; webhooks go to public addresses only"
            )
    pinned = addresses[0]
    literal = f"[{pinned}]" if pinned.version == 6 else str(pinned)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    pinned_url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    is_literal = host == str(pinned)
    return Target(
        pinned_url,
        host_header=parts.netloc,
        server_name=None if is_literal or parts.scheme != "https" else host,
    )
