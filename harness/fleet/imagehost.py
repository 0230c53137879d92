"""The lab image host: firmware images over HTTP, behind presigned, expiring URLs, with Range requests.

A URL is ``http://HOST:PORT/images/<image_id>?expires=<epoch s>&sig=<hex>``: ``sig`` is
HMAC-SHA256 over ``"<image_id>\\n<expires>"`` with a per-host random secret. The expiry is
checked on *every* request, so a download that spans the expiry fails on its next range
request (403) and the device must fetch the job document again for a fresh URL.

Answers: 200 (whole image), 206 (one satisfiable ``Range: bytes=a-b | a- | -n``, with
``Content-Range``), 416 (unsatisfiable range, ``Content-Range: bytes */SIZE``), 403 (missing,
bad or expired signature; the body says which), 404 (unknown path or image), 405 (not GET/HEAD).
A Range header that is not a single byte range is ignored (200), as HTTP allows.

TTL: `presign` accepts 60..3600 s (default 1800), the range AWS allows for presigned URLs.
``ImageHost(..., allow_short_ttl_for_tests=True)`` lifts the lower bound (any TTL > 0) so a test
can see a URL expire in a second or two; the upper bound stays. ``clock`` (default ``time.time``)
can be replaced to move time without waiting.

Fault hooks for tests: `throttle` paces response bodies (bandwidth; the only sleep here, and it
models the link), `stall_after` stops a download at a byte offset of the image and holds the
connection (until `release`, ``hold_s`` or `close`), then drops it, as a dead link does.

Every request is recorded (`requests`, `wait_request`) and logged, optionally as JSON lines to
``log_path`` (evidence for reports): a refusal (403/404/405/416) before it is sent, a transfer when
it ends (its client may have read the last byte a moment earlier: use `wait_request`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

__all__ = ["ImageHost", "ImageHostError", "ImageRequest", "MIN_TTL_S", "MAX_TTL_S", "DEFAULT_TTL_S"]

log = logging.getLogger(__name__)

MIN_TTL_S = 60
MAX_TTL_S = 3600
DEFAULT_TTL_S = 1800
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_CHUNK = 16384
_IDLE_TIMEOUT = 30.0  # s, an idle keep-alive connection is closed after this


class ImageHostError(Exception):
    """A wait on the image host ran out, or an argument was refused."""


@dataclass(frozen=True)
class ImageRequest:
    """One HTTP request as served. ``t`` is ``time.monotonic()`` when it arrived."""

    index: int
    t: float
    wall: float
    client: str
    method: str
    path: str
    image_id: str | None
    range: str | None
    status: int
    bytes_sent: int
    reason: str
    duration_s: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Stall:
    offset: int
    image_id: str | None
    once: bool
    hold_s: float


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: ImageHost


class ImageHost:
    """A threaded HTTP server for firmware images. It serves from construction until `close()`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        url_host: str | None = None,
        secret: bytes | None = None,
        allow_short_ttl_for_tests: bool = False,
        clock: Callable[[], float] = time.time,
        log_path: str | Path | None = None,
    ):
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.allow_short_ttl_for_tests = allow_short_ttl_for_tests
        self.clock = clock
        self._images: dict[str, bytes] = {}
        self._digests: dict[str, str] = {}
        self._cond = threading.Condition()
        self._requests: list[ImageRequest] = []
        self._listeners: list[Callable[[ImageRequest], None]] = []
        self._rate: float | None = None
        self._stall: _Stall | None = None
        self._stalled = threading.Event()
        self._release = threading.Event()
        self._closing = threading.Event()
        self._log_file = open(log_path, "a", buffering=1) if log_path is not None else None  # noqa: SIM115
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self.host = host
        self.port = self._server.server_address[1]
        self.url_host = url_host or (host if host not in ("0.0.0.0", "::", "") else "127.0.0.1")
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"imagehost:{self.port}", daemon=True)
        self._thread.start()

    # lifecycle ----------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        h = f"[{self.url_host}]" if ":" in self.url_host else self.url_host
        return f"http://{h}:{self.port}"

    def close(self) -> None:
        """Stop serving (ends stalls and throttled transfers too). Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._release.set()
        # serve_forever() notices shutdown() when its select() wakes: wake it with a connection
        stopper = threading.Thread(target=self._server.shutdown, daemon=True)
        stopper.start()
        with contextlib.suppress(OSError), socket.create_connection((self.url_host, self.port), timeout=1):
            pass
        stopper.join(5)
        self._server.server_close()
        self._thread.join(5)
        if self._log_file is not None:
            self._log_file.close()

    def __enter__(self) -> ImageHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # images and URLs ----------------------------------------------------------------------------
    def add(self, image_id: str, data: bytes) -> str:
        """Serve ``data`` as ``image_id`` (replacing any earlier image of that id); returns its SHA-256."""
        if not isinstance(image_id, str) or not _ID_RE.fullmatch(image_id):
            raise ValueError(f"invalid image id {image_id!r}: 1-128 of [A-Za-z0-9._-], starting alphanumeric")
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        with self._cond:
            self._images[image_id] = data
            self._digests[image_id] = digest
        return digest

    def remove(self, image_id: str) -> None:
        with self._cond:
            self._images.pop(image_id, None)
            self._digests.pop(image_id, None)

    def has(self, image_id: str) -> bool:
        with self._cond:
            return image_id in self._images

    def info(self, image_id: str) -> dict:
        """``{"sha256": hex, "size": n}`` of a served image (KeyError if unknown)."""
        with self._cond:
            return {"sha256": self._digests[image_id], "size": len(self._images[image_id])}

    def _sign(self, image_id: str, expires: int) -> str:
        return hmac.new(self._secret, f"{image_id}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def presign(self, image_id: str, ttl_s: float = DEFAULT_TTL_S) -> str:
        """A URL for ``image_id`` valid for ``ttl_s`` seconds from now (60..3600; see the module doc).

        The image need not exist (yet): a URL for an unknown image is answered 404."""
        if not isinstance(image_id, str) or not _ID_RE.fullmatch(image_id):
            raise ValueError(f"invalid image id {image_id!r}")
        ok = isinstance(ttl_s, int | float) and not isinstance(ttl_s, bool) and math.isfinite(ttl_s)
        if not ok or ttl_s <= 0 or ttl_s > MAX_TTL_S or (ttl_s < MIN_TTL_S and not self.allow_short_ttl_for_tests):
            raise ValueError(
                f"presigned URL ttl {ttl_s!r}s out of range {MIN_TTL_S}..{MAX_TTL_S}s"
                + ("" if self.allow_short_ttl_for_tests else " (allow_short_ttl_for_tests lifts the lower bound)")
            )
        expires = math.ceil(self.clock() + ttl_s)
        return f"{self.base_url}/images/{quote(image_id)}?expires={expires}&sig={self._sign(image_id, expires)}"

    def check(self, image_id: str, expires: str | None, sig: str | None) -> str | None:
        """Why a request for ``image_id`` with this query is refused, or None if the URL is good now."""
        if not expires or not sig:
            return "missing signature"
        if not expires.isdigit() or len(expires) > 12:
            return "bad signature"
        if not hmac.compare_digest(self._sign(image_id, int(expires)), sig):
            return "bad signature"
        if self.clock() > int(expires):
            return "expired"
        return None

    # fault hooks --------------------------------------------------------------------------------
    def throttle(self, bytes_per_s: float | None) -> None:
        """Pace every response body to ``bytes_per_s`` (None: full speed)."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("throttle rate must be > 0 bytes/s (or None)")
        with self._cond:
            self._rate = bytes_per_s

    def stall_after(
        self, n_bytes: int | None, *, image_id: str | None = None, once: bool = True, hold_s: float = 30.0
    ) -> None:
        """Stop the next download (of ``image_id``, or any) when it reaches byte offset ``n_bytes`` of
        the image: hold the connection silent until `release()`, ``hold_s`` or `close()`, then drop it.
        A request starting at or after the offset stalls at once. ``once``: disarm after one stall.
        ``None`` disarms."""
        with self._cond:
            self._stall = None if n_bytes is None else _Stall(int(n_bytes), image_id, once, float(hold_s))
            self._stalled.clear()
            self._release.clear()

    def release(self) -> None:
        """End a current stall now (the stalled connection is then dropped)."""
        self._release.set()

    def wait_stalled(self, timeout: float) -> None:
        """Wait until a download is stalled by `stall_after`."""
        if not self._stalled.wait(timeout):
            raise ImageHostError(
                f"timed out after {timeout:.3f}s waiting for a download to stall; last requests:\n"
                + self._tail_text()
            )

    # request log --------------------------------------------------------------------------------
    def add_listener(self, callback: Callable[[ImageRequest], None]) -> None:
        with self._cond:
            self._listeners.append(callback)

    def requests(self, image_id: str | None = None) -> list[ImageRequest]:
        with self._cond:
            return [r for r in self._requests if image_id is None or r.image_id == image_id]

    def wait_request(
        self, predicate: Callable[[ImageRequest], bool], timeout: float, *, since: int = 0, what: str = "a request"
    ) -> ImageRequest:
        """The first recorded request (index >= ``since``) matching ``predicate``; waits up to ``timeout``."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        with self._cond:
            while True:
                for r in self._requests[since:]:
                    if predicate(r):
                        return r
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ImageHostError(
                        f"timed out after {time.monotonic() - t0:.3f}s waiting for {what} on the image host;"
                        f" last requests:\n{self._tail_text()}"
                    )
                self._cond.wait(remaining)

    def _tail_text(self, n: int = 8) -> str:
        with self._cond:
            tail = self._requests[-n:]
        if not tail:
            return "  (no requests)"
        return "\n".join(
            f"  #{r.index} {r.method} {r.image_id} range={r.range} -> {r.status} {r.bytes_sent}B {r.reason}"
            for r in tail
        )

    def _record(self, **kw) -> None:
        with self._cond:
            req = ImageRequest(index=len(self._requests), **kw)
            self._requests.append(req)
            listeners = list(self._listeners)
            self._cond.notify_all()
        log.info("image host %s %s range=%s -> %s (%d bytes, %s)", req.method, req.path, req.range, req.status,
                 req.bytes_sent, req.reason)
        if self._log_file is not None:
            with contextlib.suppress(ValueError, OSError):
                self._log_file.write(json.dumps(req.as_dict()) + "\n")
        for cb in listeners:
            try:
                cb(req)
            except Exception:
                log.exception("image host listener %r failed", cb)

    # used by the handler ------------------------------------------------------------------------
    def _lookup(self, image_id: str) -> bytes | None:
        with self._cond:
            return self._images.get(image_id)

    def _stall_for(self, image_id: str, start: int, end: int) -> tuple[int, float] | None:
        """``(offset, hold_s)`` if this response (bytes start..end) must stall; disarms a ``once`` stall."""
        with self._cond:
            s = self._stall
            if s is None or (s.image_id is not None and s.image_id != image_id) or s.offset > end:
                return None
            if s.once:
                self._stall = None
            return max(s.offset, start), s.hold_s


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = _IDLE_TIMEOUT
    server_version = "cart-hil-imagehost/1"

    def log_message(self, format, *args):  # noqa: A002 - the request log replaces the stderr log
        pass

    def _begin(self):
        self._t0 = time.monotonic()
        self._wall = time.time()
        self._range = self.headers.get("Range")

    def do_GET(self):
        self._begin()
        self._serve(body=True)

    def do_HEAD(self):
        self._begin()
        self._serve(body=False)

    def _not_allowed(self):
        self._begin()
        self._finish_simple(405, "method not allowed", None, None, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    # -------------------------------------------------------------------------------------------
    def _serve(self, body: bool):
        owner = self.server.owner
        try:
            parts = urlsplit(self.path)
        except ValueError:
            return self._finish_simple(404, "bad path", None, body)
        m = re.fullmatch(r"/images/([^/]+)", parts.path)
        if m is None:
            return self._finish_simple(404, "no such path", None, body)
        image_id = m.group(1)
        query = parse_qs(parts.query, keep_blank_values=True)
        why = None
        if not _ID_RE.fullmatch(image_id):
            why = "bad signature"
        else:
            why = owner.check(image_id, (query.get("expires") or [None])[0], (query.get("sig") or [None])[0])
        if why is not None:
            return self._finish_simple(403, why, image_id, body)
        data = owner._lookup(image_id)
        if data is None:
            return self._finish_simple(404, "unknown image", image_id, body)
        size = len(data)
        start, end, status = 0, size - 1, 200
        rng = self._range
        if rng is not None:
            rm = _RANGE_RE.fullmatch(rng.strip())
            if rm and (rm.group(1) or rm.group(2)):
                a, b = rm.group(1), rm.group(2)
                if a == "":                       # suffix: the last n bytes
                    n = int(b)
                    if n == 0:
                        return self._unsatisfiable(image_id, size, body)
                    start, end = max(0, size - n), size - 1
                else:
                    start = int(a)
                    end = size - 1 if b == "" else min(int(b), size - 1)
                    if start >= size or (b != "" and int(b) < start):
                        return self._unsatisfiable(image_id, size, body)
                status = 206
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Cache-Control": "no-store",
            "Content-Length": str(end - start + 1 if size else 0),
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        sent, reason = 0, "ok"
        if body and size:
            sent, reason = self._send_body(owner, image_id, data, start, end)
        self._log(status, image_id, sent, reason)

    def _send_body(self, owner: ImageHost, image_id: str, data: bytes, start: int, end: int) -> tuple[int, str]:
        stall = owner._stall_for(image_id, start, end)
        stall_at, hold = (None, 0.0) if stall is None else stall
        stop = end + 1 if stall_at is None else stall_at
        pos, sent = start, 0
        t_begin = time.monotonic()
        try:
            while pos < stop:
                rate = owner._rate
                chunk = _CHUNK if rate is None else max(1, min(_CHUNK, int(rate / 20)))
                n = min(chunk, stop - pos)
                self.wfile.write(data[pos:pos + n])
                pos += n
                sent += n
                if rate is not None:  # bandwidth: wait until this much data "took" its time on the link
                    ahead = sent / rate - (time.monotonic() - t_begin)
                    if ahead > 0 and owner._closing.wait(ahead):
                        self.close_connection = True
                        return sent, "host closing"
            self.wfile.flush()
        except OSError as e:
            self.close_connection = True
            return sent, f"client gone: {e.__class__.__name__}"
        if stall_at is None:
            return sent, "ok"
        owner._stalled.set()
        log.info("image host: stalled %s at offset %d", image_id, stall_at)
        owner._release.wait(hold)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        return sent, f"stalled at offset {stall_at}, connection dropped"

    def _unsatisfiable(self, image_id: str, size: int, body: bool):
        self._finish_simple(416, "range not satisfiable", image_id, body, extra={"Content-Range": f"bytes */{size}"})

    def _finish_simple(self, status: int, reason: str, image_id: str | None, body: bool | None, extra=None):
        text = (reason + "\n").encode()
        # recorded before it is sent: whoever sees a refusal finds it in the log already
        self._log(status, image_id, len(text) if body is not False else 0, reason)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(text)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body is not False:
            with contextlib.suppress(OSError):
                self.wfile.write(text)

    def _log(self, status: int, image_id: str | None, sent: int, reason: str):
        self.server.owner._record(
            t=self._t0, wall=self._wall, client=f"{self.client_address[0]}:{self.client_address[1]}",
            method=self.command, path=self.path.split("?", 1)[0], image_id=image_id, range=self._range,
            status=status, bytes_sent=sent, reason=reason, duration_s=time.monotonic() - self._t0,
        )
