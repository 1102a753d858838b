"""Which network addresses gather-cc may connect to: public ones only, unless told otherwise.

A URL list from the internet must not make the downloader reach the machine it runs on or its network:
loopback, private (RFC 1918, unique-local IPv6), link-local (including the cloud metadata service at
169.254.169.254), carrier-grade NAT, multicast, unspecified and reserved addresses are refused, for IPv4
and IPv6, including IPv4 addresses embedded in IPv6 (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96,
6to4 2002::/16). Such a row is counted as `blocked_address`.

The check is made on the address actually connected to: `PublicResolver` filters what DNS returns (the
connector connects only to the addresses it hands back, so a hostname that resolves to 127.0.0.1, or
re-resolves to it later, "DNS rebinding", is refused), and `check_url` refuses a literal IP in a URL, which
never reaches a resolver. Redirects are followed one hop at a time (gather_fetch), each hop checked the
same way. `AddressPolicy(allow_private=True)` (`--allow-private-hosts`) lifts the rule, for local mirrors
and the tests; `allowed_endpoints` allows single private `address:port` endpoints only.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp.abc import AbstractResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddress(OSError):
    """A destination that is not a public address (raised instead of connecting)."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address (for IPv6, also its embedded IPv4 address if any)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None and not is_public(embedded):
            return False
    return address.is_global and not (
        address.is_multicast
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_unspecified
    )


@dataclass(frozen=True)
class AddressPolicy:
    """`allow_private`: connect anywhere. `allowed_endpoints`: non-public `(address, port)` pairs allowed
    anyway (port None: any port), e.g. a local mirror."""

    allow_private: bool = False
    allowed_endpoints: frozenset[tuple[IPAddress, int | None]] = field(default_factory=frozenset)

    @classmethod
    def from_flags(cls, allow_private_hosts: bool, endpoints: list[str] | tuple[str, ...] = ()) -> AddressPolicy:
        """From `--allow-private-hosts` and `--allow-private-host ADDRESS[:PORT]` values ([v6]:port for IPv6)."""
        return cls(allow_private_hosts, frozenset(parse_endpoint(text) for text in endpoints))

    def allows(self, address: str | IPAddress, port: int | None = None) -> bool:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if self.allow_private or is_public(ip):
            return True
        return (ip, port) in self.allowed_endpoints or (ip, None) in self.allowed_endpoints

    def check_host(self, host: str, port: int | None) -> None:
        """Raise BlockedAddress when `host` is a literal IP address the policy refuses (names go to DNS)."""
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        if not self.allows(ip, port):
            raise BlockedAddress(f"{host} is not a public address")


def parse_endpoint(text: str) -> tuple[IPAddress, int | None]:
    """`10.0.0.5`, `10.0.0.5:8080`, `[fd00::1]:8080` or `fd00::1` -> (address, port or None)."""
    text = text.strip()
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    return ipaddress.ip_address(host), port


class PublicResolver(AbstractResolver):
    """A resolver that hands the connector only the addresses `policy` allows (raises when none is left)."""

    def __init__(self, policy: AddressPolicy, resolver: AbstractResolver | None = None) -> None:
        if resolver is None:
            from aiohttp.resolver import DefaultResolver

            resolver = DefaultResolver()
        self.policy, self.resolver = policy, resolver

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        answers = await self.resolver.resolve(host, port, family)
        allowed = [answer for answer in answers if self.policy.allows(answer["host"], port)]
        if not allowed:
            addresses = ", ".join(sorted({answer["host"] for answer in answers}))
            raise BlockedAddress(f"{host} resolves only to non-public addresses ({addresses})")
        return allowed

    async def close(self) -> None:
        await self.resolver.close()
