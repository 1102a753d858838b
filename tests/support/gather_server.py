"""A local image server on 127.0.0.1 for gather-cc tests: good images, every failure kind, no internet.

Images are built before they are requested: `write_tsv` (or `server.prepare`) encodes every image a test's
rows name, so a request only copies bytes and the client's generous `LOCAL["timeout"]` is never hit on a
slow or loaded machine. Only the deliberately slow routes (`/slow`, `/hold`) wait, and only the test that
checks timeouts uses a short one (`SHORT_TIMEOUT`).

Routes (all GET):
  /jpg/WxH, /png/WxH, /webp/WxH, /rgba/WxH    a gradient image of that size (rgba: transparent PNG)
  /png16/WxH                                  a 16-bit grayscale PNG, every pixel 32768 (8-bit: 128)
  /status/CODE                                an empty response with that status
  /slow                                       waits until the session ends (far beyond SHORT_TIMEOUT)
  /hold/NAME/<route>                          waits until the test calls `server.release(NAME)`, then <route>
  /elsewhere/<route>                          a redirect to <route> on `server.elsewhere_port` (another server)
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
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

IMAGE_ROUTES = ("jpg", "png", "webp", "rgba", "png16")


def image_bytes(kind: str, width: int, height: int) -> bytes:
    """A deterministic image encoded as `kind` (jpg, png, webp, rgba = PNG with alpha, png16 = 16-bit gray)."""
    if kind == "png16":
        image = Image.fromarray(np.full((height, width), 32768, dtype=np.uint16))
    else:
        image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    if kind == "rgba":
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize((width, height)))
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "rgba": "PNG", "png16": "PNG"}[kind])
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

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = urlsplit(self.path).path
        self.server.hits[path] += 1
        try:
            self._route(path)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout / too_large / killed)
            pass

    def _route(self, path: str) -> None:
        parts = path.strip("/").split("/")
        route = parts[0]
        if route == "hold":
            self.server.holds[parts[1]].wait(timeout=600)
            return self._route("/" + "/".join(parts[2:]))
        if route in IMAGE_ROUTES:
            body = self.server.bodies.get(path)
            if body is None:  # a test bug: every image must be prepared (write_tsv does it)
                return self._send(500, f"{path} was not prepared".encode(), "text/plain")
            return self._send(200, body, "image/png" if route == "png16" else f"image/{route}")
        if route == "status":
            return self._send(int(parts[1]))
        if route == "slow":
            self.server.stopping.wait(timeout=600)
            return self._send(200, self.server.bodies.get("/jpg/300x200", b""))
        if route == "elsewhere":
            return self._redirect(f"http://127.0.0.1:{self.server.elsewhere_port}/" + "/".join(parts[1:]))
        if route == "truncated":
            data = self.server.truncated
            return self._send(200, data[: len(data) // 2])
        if route == "html":
            return self._send(200, b"<!doctype html><html><body>gone</body></html>", "text/html")
        if route == "big":
            return self._send(200, b"\xff" * int(parts[1]))
        if route == "stream":
            return self._send(200, b"\xff" * int(parts[1]), length=False)
        if route == "optout":
            return self._send(200, self.server.small_jpeg, robots="noai")
        if route == "loop":
            return self._redirect(path)
        if route == "flaky":
            with self.server.lock:
                failing = self.server.failures[parts[1]] > 0
                self.server.failures[parts[1]] -= failing
            return self._send(503) if failing else self._send(200, self.server.flaky_jpeg)
        return self._send(404)


class _ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops SYNs under 100+ concurrent connections

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.bodies: dict[str, bytes] = {}
        self.holds: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.stopping = threading.Event()
        self.elsewhere_port = 0
        self.truncated = image_bytes("jpg", 600, 400)
        self.small_jpeg = image_bytes("jpg", 300, 200)
        self.flaky_jpeg = image_bytes("jpg", 320, 240)
        self.prepare("/jpg/300x200")

    def handle_error(self, request, client_address) -> None:  # a client hanging up is not an error here
        pass

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def prepare(self, path: str) -> None:
        """Encode the image an image route names (`/jpg/640x480`, also inside `/hold/...` or `/elsewhere/...`)."""
        parts = urlsplit(path).path.strip("/").split("/")
        while parts and parts[0] in ("hold", "elsewhere"):
            parts = parts[2:] if parts[0] == "hold" else parts[1:]
        if parts and parts[0] in IMAGE_ROUTES:
            key = "/" + "/".join(parts)
            if key not in self.bodies:
                width, height = map(int, parts[1].split("x"))
                self.bodies[key] = image_bytes(parts[0], width, height)

    def release(self, name: str) -> None:
        self.holds[name].set()


def _serve():
    server = _ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def _stop(server: _ImageServer) -> None:
    server.stopping.set()
    for event in server.holds.values():
        event.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def image_server():
    """One server for the session; tests that count requests clear `hits` first and use their own paths.

    `/elsewhere/...` redirects to a second server on another port (`image_server.elsewhere`)."""
    server, elsewhere = _serve(), _serve()
    server.elsewhere_port = elsewhere.port
    server.elsewhere = elsewhere
    yield server
    _stop(server)
    _stop(elsewhere)


# Options for gather_cc runs against the local server: a timeout no prepared route comes near, private
# addresses allowed (the server is on 127.0.0.1), small limits.
LOCAL = dict(
    timeout=60.0, max_bytes=100_000, backoff=0.01, max_pixels=2_000_000, progress=False, allow_private_hosts=True
)
SHORT_TIMEOUT = 0.5  # only for the test that checks timeouts, against /slow

# (caption, path on the test server, expected outcome)
MIXED_ROWS = [
    ("a large photo", "/jpg/1024x768", "ok"),
    ("a png drawing", "/png/600x400", "ok"),
    ("a webp picture", "/webp/300x300", "ok"),
    ("a transparent logo", "/rgba/400x300", "ok"),
    ("a dead link", "/status/404", "http_404"),
    ("a 16-bit scan", "/png16/300x200", "ok"),
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
    """A CC3M-style list (caption<TAB>url) of `rows` on `server`, every image it names prepared."""
    for _, url, *_ in rows:
        server.prepare(url)
    path.write_text("".join(f"{caption}\t{server.url(url)}\n" for caption, url, *_ in rows), encoding="utf-8")
    return path


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
