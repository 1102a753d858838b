"""Download one URL with aiohttp: a per-attempt timeout, a byte cap, and bounded retries with backoff.

Every outcome is either the body or one short failure kind that `stats.json` counts:
http_<status>, timeout, too_large, redirect_loop, dns_error, ssl_error, connection_error, bad_url,
bad_response, opted_out. Only connection errors and HTTP 429/5xx are retried: they are the
transient ones. A timeout is not retried, because on CC3M it is almost always a dead host and each
retry would cost another full `timeout`.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:  # aiohttp's header type (multidict is aiohttp's dependency, not ours)
    from multidict import CIMultiDictProxy

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
_RETRIED = frozenset(str(status) for status in RETRIED_STATUSES)
MAX_RETRY_AFTER_S = 60.0
# X-Robots-Tag directives by which a site opts its images out of dataset collection (img2dataset's defaults).
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
CHUNK_BYTES = 1 << 16
MAX_REDIRECTS = 10
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


async def _get_once(
    session: aiohttp.ClientSession, url: str, *, timeout: float, max_bytes: int
) -> tuple[str, bytes | None, float | None]:
    """(reason, body, retry-after seconds) of one GET; exceptions are mapped to failure kinds."""
    try:
        request_timeout = aiohttp.ClientTimeout(total=timeout)
        async with session.get(url, timeout=request_timeout, max_redirects=MAX_REDIRECTS) as response:
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
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
        return "timeout", None, None
    except aiohttp.TooManyRedirects:
        return "redirect_loop", None, None
    except _DNS_ERRORS:
        return "dns_error", None, None
    except (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError):
        return "ssl_error", None, None
    except _BAD_URL_ERRORS:
        return "bad_url", None, None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        return "connection_error", None, None
    except (aiohttp.ClientResponseError, ValueError, UnicodeError):  # malformed status line or headers
        return "bad_response", None, None
    except aiohttp.ClientError:
        return "connection_error", None, None


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    *,
    timeout: float,
    max_bytes: int,
    retries: int,
    backoff: float,
    rng: random.Random | None = None,
) -> FetchResult:
    """GET `url` up to 1 + `retries` times; waits backoff * 2^attempt * U(0.5, 1) (or Retry-After) between."""
    rng = rng or random.Random()
    for attempt in range(retries + 1):
        reason, body, retry_after = await _get_once(session, url, timeout=timeout, max_bytes=max_bytes)
        retry = reason == "connection_error" or (reason.startswith("http_") and reason[5:] in _RETRIED)
        if not retry or attempt == retries:
            return FetchResult(reason, body, attempt + 1)
        delay = backoff * 2**attempt * rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def make_session(*, concurrency: int, user_agent: str) -> aiohttp.ClientSession:
    """One shared session: a connection pool of `concurrency`, DNS answers cached for 5 minutes."""
    connector = aiohttp.TCPConnector(limit=concurrency, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": user_agent},
        raise_for_status=False,
    )
