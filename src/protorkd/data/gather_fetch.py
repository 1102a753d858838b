"""Download one URL with aiohttp: a per-attempt timeout, a byte cap, and bounded retries with backoff.

Every outcome is either the body or one short failure kind that `stats.json` counts:
http_<status>, timeout, too_large, redirect_loop, dns_error, ssl_error, connection_error, bad_url,
bad_response, opted_out, blocked_address. Only connection errors and HTTP 429/5xx are retried: they are
the transient ones. A timeout is not retried, because on CC3M it is almost always a dead host and each
retry would cost another full `timeout`.

Redirects are followed here, one hop at a time, so that every hop's destination passes the session's
`AddressPolicy` (gather_addresses): a literal IP in the URL is checked before connecting, a hostname by
the session's `PublicResolver`, whose answers are the only addresses the connector may use.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from protorkd.data.gather_addresses import AddressPolicy, BlockedAddress, PublicResolver

if TYPE_CHECKING:  # aiohttp's header type (multidict is aiohttp's dependency, not ours)
    from multidict import CIMultiDictProxy

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
_RETRIED = frozenset(str(status) for status in RETRIED_STATUSES)
MAX_RETRY_AFTER_S = 60.0
# X-Robots-Tag directives by which a site opts its images out of dataset collection (img2dataset's defaults).
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
CHUNK_BYTES = 1 << 16
MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Newer aiohttp names for what older versions (>= 3.9, our floor) raise as their base classes.
_DNS_ERRORS = (getattr(aiohttp, "ClientConnectorDNSError", ()),)
_BAD_URL_ERRORS = (
    aiohttp.InvalidURL,
    getattr(aiohttp, "NonHttpUrlRedirectClientError", ()),
    getattr(aiohttp, "InvalidUrlRedirectClientError", ()),
)


@dataclass(frozen=True)
class FetchResult:
    """`data` is the body when `reason` is "ok"; `attempts` counts the requests made."""

    reason: str
    data: bytes | None = None
    attempts: int = 1


def is_transient(reason: str) -> bool:
    """Failure kinds worth another try on a later run (`--retry-failed`)."""
    if reason.startswith("http_"):
        return reason[5:] in _RETRIED
    return reason in ("connection_error", "timeout", "dns_error")


def _opted_out(headers: CIMultiDictProxy[str]) -> bool:
    """True when an X-Robots-Tag header carries one of OPT_OUT_DIRECTIVES."""
    for value in headers.getall("X-Robots-Tag", []):
        directives = {part.strip().lower() for part in value.replace(":", ",").split(",")}
        if directives & OPT_OUT_DIRECTIVES:
            return True
    return False


def _blocked(error: BaseException) -> bool:
    """True when `error` is, or wraps, a refused destination (aiohttp wraps resolver errors)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, BlockedAddress) or isinstance(getattr(error, "os_error", None), BlockedAddress):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


async def _follow(
    session: aiohttp.ClientSession, url: str, policy: AddressPolicy, max_bytes: int
) -> tuple[str, bytes | None, float | None]:
    """GET `url`, following up to MAX_REDIRECTS redirects, each destination checked against `policy`."""
    target = URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        if target.scheme not in ("http", "https") or not target.host:
            return "bad_url", None, None
        policy.check_host(target.host, target.port)
        async with session.get(target, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status in REDIRECT_STATUSES and location:
                target = response.url.join(URL(location))
                continue
            if response.status != 200:
                retry_after = response.headers.get("Retry-After", "")
                return f"http_{response.status}", None, float(retry_after) if retry_after.isdigit() else None
            if _opted_out(response.headers):
                return "opted_out", None, None
            if response.content_length is not None and response.content_length > max_bytes:
                return "too_large", None, None
            body = bytearray()
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                body += chunk
                if len(body) > max_bytes:  # also caps bodies without Content-Length, and gzip bombs
                    return "too_large", None, None
            return "ok", bytes(body), None
    return "redirect_loop", None, None


async def _get_once(
    session: aiohttp.ClientSession, url: str, *, timeout: float, max_bytes: int, policy: AddressPolicy
) -> tuple[str, bytes | None, float | None]:
    """(reason, body, retry-after seconds) of one GET and its redirects within `timeout` seconds in all;
    exceptions are mapped to failure kinds."""
    try:
        return await asyncio.wait_for(_follow(session, url, policy, max_bytes), timeout)
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
        return "timeout", None, None
    except Exception as error:
        if _blocked(error):
            return "blocked_address", None, None
        return _failure_kind(error), None, None


def _failure_kind(error: Exception) -> str:
    if isinstance(error, aiohttp.TooManyRedirects):
        return "redirect_loop"
    if isinstance(error, _DNS_ERRORS):
        return "dns_error"
    if isinstance(error, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
        return "ssl_error"
    if isinstance(error, _BAD_URL_ERRORS):
        return "bad_url"
    if isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return "connection_error"
    if isinstance(error, (aiohttp.ClientResponseError, ValueError, UnicodeError)):  # malformed status line, headers
        return "bad_response"
    if isinstance(error, (aiohttp.ClientError, OSError)):
        return "connection_error"
    raise error


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    *,
    timeout: float,
    max_bytes: int,
    retries: int,
    backoff: float,
    rng: random.Random | None = None,
    policy: AddressPolicy | None = None,
) -> FetchResult:
    """GET `url` up to 1 + `retries` times; waits backoff * 2^attempt * U(0.5, 1) (or Retry-After) between.

    `policy` must be the one `session` was made with (`make_session`): it checks literal IP hosts, the
    session's resolver checks names."""
    rng, policy = rng or random.Random(), policy or AddressPolicy()
    for attempt in range(retries + 1):
        reason, body, retry_after = await _get_once(session, url, timeout=timeout, max_bytes=max_bytes, policy=policy)
        retry = reason == "connection_error" or (reason.startswith("http_") and reason[5:] in _RETRIED)
        if not retry or attempt == retries:
            return FetchResult(reason, body, attempt + 1)
        delay = backoff * 2**attempt * rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def make_session(
    *,
    concurrency: int,
    user_agent: str,
    policy: AddressPolicy | None = None,
    resolver: aiohttp.abc.AbstractResolver | None = None,
) -> aiohttp.ClientSession:
    """One shared session: a connection pool of `concurrency`, DNS answers (only those `policy` allows: public
    addresses by default) cached for 5 minutes. `resolver` replaces the system resolver (tests)."""
    policy = policy or AddressPolicy()
    connector = aiohttp.TCPConnector(limit=concurrency, ttl_dns_cache=300, resolver=PublicResolver(policy, resolver))
    return aiohttp.ClientSession(connector=connector, headers={"User-Agent": user_agent}, raise_for_status=False)
