"""A local image server on 127.0.0.1 for gather-cc tests: good images, every failure kind, no internet.

Routes (all GET; `?delay=S` on any route sleeps S seconds first):
  /jpg/WxH, /png/WxH, /webp/WxH, /rgba/WxH   a gradient image of that size (rgba: transparent PNG)
  /status/CODE                                an empty response with that status
  /slow                                       sleeps 3 s, then an image (beyond a short --timeout)
  /truncated                                  the first half of a JPEG
  /html                                       an HTML page served with status 200
  /big/N, /stream/N                           N bytes, with / without Content-Length
  /loop                                       a redirect to itself
  /flaky/NAME                                 503 while `server.failures[NAME]` > 0 (decremented), then a JPEG
  /optout                                     a JPEG sent with `X-Robots-Tag: noai`
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image


@lru_cache(maxsize=64)
def image_bytes(kind: str, width: int, height: int) -> bytes:
    """A deterministic gradient image encoded as `kind` (jpg, png, webp, rgba = PNG with alpha)."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    if kind == "rgba":
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize((width, height)))
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "rgba": "PNG"}[kind])
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: _ImageServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(
        self, status: int, body: bytes = b"", content_type: str = "image/jpeg", length: bool = True, robots: str = ""
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if robots:
            self.send_header("X-Robots-Tag", robots)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        self.server.hits[url.path] += 1
        delay = float(parse_qs(url.query).get("delay", ["0"])[0])
        if delay:
            time.sleep(delay)
        parts = url.path.strip("/").split("/")
        route = parts[0]
        try:
            if route in ("jpg", "png", "webp", "rgba"):
                width, height = map(int, parts[1].split("x"))
                self._send(200, image_bytes(route, width, height), f"image/{route}")
            elif route == "status":
                self._send(int(parts[1]))
            elif route == "slow":
                time.sleep(3)
                self._send(200, image_bytes("jpg", 300, 200))
            elif route == "truncated":
                data = image_bytes("jpg", 600, 400)
                self._send(200, data[: len(data) // 2])
            elif route == "html":
                self._send(200, b"<!doctype html><html><body>gone</body></html>", "text/html")
            elif route == "big":
                self._send(200, b"\xff" * int(parts[1]))
            elif route == "stream":
                self._send(200, b"\xff" * int(parts[1]), length=False)
            elif route == "optout":
                self._send(200, image_bytes("jpg", 300, 200), robots="noai")
            elif route == "loop":
                self.send_response(302)
                self.send_header("Location", url.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif route == "flaky":
                with self.server.lock:
                    failing = self.server.failures[parts[1]] > 0
                    self.server.failures[parts[1]] -= failing
                if failing:
                    self._send(503)
                else:
                    self._send(200, image_bytes("jpg", 320, 240))
            else:
                self._send(404)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout / too_large)
            pass


class _ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops SYNs under 100+ concurrent connections

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # a client hanging up is not an error here
        pass

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(scope="session")
def image_server():
    """One server for the session; tests that count requests clear `hits` first and use their own paths."""
    server = _ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


FAST = dict(timeout=0.5, max_bytes=100_000, backoff=0.01, max_pixels=2_000_000, progress=False)

# (caption, path on the test server, expected outcome)
MIXED_ROWS = [
    ("a large photo", "/jpg/1024x768", "ok"),
    ("a png drawing", "/png/600x400", "ok"),
    ("a webp picture", "/webp/300x300", "ok"),
    ("a transparent logo", "/rgba/400x300", "ok"),
    ("a dead link", "/status/404", "http_404"),
    ("a slow host", "/slow", "timeout"),
    ("a truncated jpeg", "/truncated", "decode_error"),
    ("an error page", "/html", "not_an_image"),
    ("a huge file", "/big/300000", "too_large"),
    ("an endless stream", "/stream/300000", "too_large"),
    ("a redirect loop", "/loop", "redirect_loop"),
    ("a tracking pixel", "/jpg/8x8", "too_small"),
    ("a panorama", "/jpg/1500x200", "bad_aspect"),
    ("", "/jpg/310x300", "empty_caption"),
    ("a busy server", "/flaky/mixed", "ok"),
    ("a broken server", "/status/500", "http_500"),
    ("a decompression bomb", "/png/2000x2000", "too_many_pixels"),
    ("a tall photo", "/jpg/400x900", "ok"),
    ("an opted-out image", "/optout", "opted_out"),
]


def write_tsv(path: Path, server, rows) -> Path:
    path.write_text("".join(f"{caption}\t{server.url(url)}\n" for caption, url, *_ in rows), encoding="utf-8")
    return path


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
