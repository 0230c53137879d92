"""The lab image host: firmware images over HTTP, behind presigned, expiring URLs, with Range requests.

A URL is ``http://HOST:PORT/images/<image_id>?expires=<epoch s>&sig=<hex>``: ``sig`` is
HMAC-SHA256 over ``"<image_id>\\n<expires>"`` with a per-host random secret. The expiry is
checked on *every* request, so a download that spans the expiry fails on its next range
request (403) and the device must fetch the job document again for a fresh URL.

Answers: 200 (whole image), 206 (one satisfiable byte range, with ``Content-Range``), 416 (the
Range was refused, with ``Content-Range: bytes */SIZE``), 403 (missing, bad or expired signature;
the body says which), 404 (unknown path or image), 405 (not GET/HEAD), and what the standard library
answers to a request it cannot parse (400, 414, 431, 501, 505; recorded too, with ``image_id`` None).

Range (RFC 9110 section 14), on GET only ("GET is the only method for which range handling is
defined"; a HEAD's Range is ignored):

- a Range that does not start with the unit ``bytes=`` (case-insensitive) is ignored: 200 ("An
  origin server MUST ignore a Range header field that contains a range unit it does not understand");
- ``bytes=`` with a single range ``a-b``, ``a-`` or ``-n`` (ASCII digits, optional blanks around the
  spec) is served 206 when satisfiable (``b`` past the end is cut to the end, ``-n`` larger than the
  image is the whole image) and refused 416 when not: ``a`` at or past the size (however many digits
  it has), ``-0``, any range of an empty image;
- ``bytes=`` with an invalid range set (``bytes=abc``, ``bytes=-``, ``bytes=``, ``bytes=5-2``, signs,
  non-ASCII digits, junk around it) and more than one Range header field are refused 416 as well:
  RFC 9110 lets a server "ignore or reject a Range header field that contains an invalid
  ranges-specifier", and this host rejects, so a broken client sees it rather than a whole image;
- several well-formed ranges (``bytes=0-1,5-6``): this host sends no multipart/byteranges, so it
  ignores the header and sends the whole image, 200 ("A server MAY ignore the Range header field").

Connections: a request head (request line and headers) must arrive complete within
``idle_timeout_s`` (default 5 s) of the connection opening or of the previous response ending, or
the connection is closed without an answer (a client that connects and sends nothing, or half a
request, or trickles a byte at a time, or keeps an idle keep-alive connection, is cut off). A client
that stops taking data is dropped when a send of one chunk (16 KiB at most) has not completed within
``send_timeout_s`` (default 30 s: a device may pause reading while it writes flash).
Every connection has its own handler thread, tracked: `close()` stops accepting, ends stalls and
throttled transfers, shuts down every open connection and joins every handler thread (bounded), so
nothing of the host outlives it. A handler never lets an exception out: a client gone mid-answer
is a normal end, anything else is logged and kept in `handler_errors()` (a test asserts it empty).

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
import io
import json
import logging
import math
import re
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

__all__ = [
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_SEND_TIMEOUT_S",
    "DEFAULT_TTL_S",
    "ImageHost",
    "ImageHostError",
    "ImageRequest",
    "MAX_TTL_S",
    "MIN_TTL_S",
    "parse_range",
]

log = logging.getLogger(__name__)

MIN_TTL_S = 60
MAX_TTL_S = 3600
DEFAULT_TTL_S = 1800
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEFAULT_IDLE_TIMEOUT_S = 5.0   # a request head must arrive complete within this
DEFAULT_SEND_TIMEOUT_S = 30.0  # a client that takes no data for this long is dropped
_CLOSE_JOIN_S = 5.0            # close() waits this long, in all, for the handler threads to end
_SPEC_RE = re.compile(r"([0-9]*)-([0-9]*)")   # ASCII digits only (\d would take any Unicode digit)
_MAX_DIGITS = 18               # a position with more digits is past the end of any image
_HUGE = 10**18
_OWS = " \t"
_FOLD_RE = re.compile(r"\r?\n[ \t]+")
_CHUNK = 16384
_LOG_FIELD_MAX = 2048          # request path / Range as recorded (a request line may be 64 KiB)


class RangeRefused(Exception):
    """A Range the host answers 416 (``reason``: why)."""


def _position(digits: str) -> int:
    return _HUGE if len(digits) > _MAX_DIGITS else int(digits)


def parse_range(values: list[str] | None, size: int) -> tuple[int, int] | None:
    """What a GET with these Range header field values gets from an image of ``size`` bytes.

    Returns ``(start, end)`` (inclusive) for a 206, or None for a 200 (no Range, a unit other than
    bytes, several well-formed ranges); raises `RangeRefused` for a 416. See the module doc."""
    if not values:
        return None
    if len(values) > 1:
        raise RangeRefused("more than one Range header field")
    value = _FOLD_RE.sub(" ", values[0]).strip(_OWS)  # RFC 9112 5.2: an obs-fold is read as a space
    if value[:6].lower() != "bytes=":
        return None
    specs = [x.strip(_OWS) for x in value[6:].split(",")]
    specs = [x for x in specs if x]  # a list may carry empty elements
    if not specs:
        raise RangeRefused("invalid range: no range in bytes=")
    parsed = []
    for spec in specs:
        m = _SPEC_RE.fullmatch(spec)
        if m is None or not (m.group(1) or m.group(2)):
            raise RangeRefused(f"invalid range {spec[:40]!r}")
        a, b = m.group(1), m.group(2)
        if a and b and _position(b) < _position(a):
            raise RangeRefused(f"invalid range {spec[:40]!r}: last before first")
        parsed.append((a, b))
    if len(parsed) > 1:
        return None  # no multipart/byteranges here: the Range is ignored
    a, b = parsed[0]
    if size == 0:
        raise RangeRefused("range not satisfiable: the image is empty")
    if not a:  # suffix: the last n bytes
        n = _position(b)
        if n == 0:
            raise RangeRefused("range not satisfiable: bytes=-0")
        return max(0, size - n), size - 1
    start = _position(a)
    if start >= size:
        raise RangeRefused("range not satisfiable: starts at or past the end")
    return start, (size - 1 if not b else min(_position(b), size - 1))


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


class _Server(HTTPServer):
    """Binds and builds handlers; the ImageHost runs the accept loop and the handler threads."""

    allow_reuse_address = True
    request_queue_size = 64
    owner: ImageHost

    def handle_error(self, request, client_address) -> None:  # never the default print to stderr
        self.owner._handler_failed(client_address)


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
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
    ):
        for name, v in (("idle_timeout_s", idle_timeout_s), ("send_timeout_s", send_timeout_s)):
            ok = isinstance(v, int | float) and not isinstance(v, bool)
            if not ok or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number of seconds > 0, not {v!r}")
        self.idle_timeout_s = float(idle_timeout_s)
        self.send_timeout_s = float(send_timeout_s)
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.allow_short_ttl_for_tests = allow_short_ttl_for_tests
        self.clock = clock
        self._images: dict[str, bytes] = {}
        self._digests: dict[str, str] = {}
        self._etags: dict[str, str] = {}  # image id -> the ETag it is served under (default: its SHA-256)
        self._cond = threading.Condition()
        self._requests: list[ImageRequest] = []
        self._listeners: list[Callable[[ImageRequest], None]] = []
        self._rate: float | None = None
        self._stall: _Stall | None = None
        self._stalled = threading.Event()
        self._release = threading.Event()
        self._closing = threading.Event()
        self._handlers: dict[threading.Thread, socket.socket] = {}  # live handler threads, their connection
        self._errors: list[str] = []
        self._log_file = open(log_path, "a", buffering=1) if log_path is not None else None  # noqa: SIM115
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self.host = host
        self.port = self._server.server_address[1]
        self.url_host = url_host or (host if host not in ("0.0.0.0", "::", "") else "127.0.0.1")
        self._thread = threading.Thread(target=self._accept_loop, name=f"imagehost:{self.port}", daemon=True)
        self._thread.start()

    # lifecycle ----------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        h = f"[{self.url_host}]" if ":" in self.url_host else self.url_host
        return f"http://{h}:{self.port}"

    def close(self) -> None:
        """Stop serving: no new connections; stalls and throttled transfers end; every open connection
        (idle, half a request, mid-transfer) is shut down and every handler thread joined (within
        about 5 s in all; one still alive then is logged). Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._release.set()
        listener = self._server.socket
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        self._thread.join(1.0)
        if self._thread.is_alive():  # elsewhere: wake it with a connection, which it drops
            with contextlib.suppress(OSError), socket.create_connection((self.url_host, self.port), timeout=1):
                pass
            self._thread.join(2.0)
        self._server.server_close()
        with self._cond:
            handlers = dict(self._handlers)
        for sock in handlers.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a recv or send blocked on it
        deadline = time.monotonic() + _CLOSE_JOIN_S
        for t in handlers:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in handlers if t.is_alive()]
        if alive:
            log.warning("image host %s: handler threads still alive after close: %s", self.port, alive)
        if self._log_file is not None:
            self._log_file.close()

    def handler_threads(self) -> list[threading.Thread]:
        """The handler threads alive now (one per open connection)."""
        with self._cond:
            return [t for t in self._handlers if t.is_alive()]

    def open_connections(self) -> int:
        """How many connections are open (each has its handler thread)."""
        with self._cond:
            return len(self._handlers)

    def wait_open_connections(self, n: int, timeout: float) -> None:
        """Wait until exactly ``n`` connections are open (0: every handler thread has ended)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        with self._cond:
            while len(self._handlers) != n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ImageHostError(
                        f"timed out after {time.monotonic() - t0:.3f}s waiting for {n} open connection(s) on the"
                        f" image host; open: {sorted(t.name for t in self._handlers) or 'none'}"
                    )
                self._cond.wait(remaining)

    def handler_errors(self) -> list[str]:
        """Exceptions that escaped a request handler (each logged with its traceback): should be none."""
        with self._cond:
            return list(self._errors)

    # connections --------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        listener = self._server.socket
        while not self._closing.is_set():
            try:
                sock, addr = listener.accept()
            except OSError as e:
                if self._closing.is_set():
                    return
                log.warning("image host %s: accept failed: %s", self.port, e)  # e.g. out of descriptors
                self._closing.wait(0.05)  # a back-off, not a wait for anything: a lasting error must not spin
                continue
            self._spawn(sock, addr)

    def _spawn(self, sock: socket.socket, addr) -> None:
        t = threading.Thread(target=self._handle_connection, args=(sock, addr), daemon=True,
                             name=f"imagehost:{self.port}:{addr[0]}:{addr[1]}")
        with self._cond:
            if self._closing.is_set():
                refused = True
            else:
                refused = False
                self._handlers[t] = sock
                self._cond.notify_all()
        if refused:
            self._server.shutdown_request(sock)
            return
        t.start()

    def _handle_connection(self, sock: socket.socket, addr) -> None:
        try:
            self._server.finish_request(sock, addr)
        except OSError as e:  # the client went away before its handler was set up
            log.debug("image host %s: connection %s ended early: %r", self.port, addr, e)
        except Exception:
            self._handler_failed(addr)
        finally:
            self._server.shutdown_request(sock)
            with self._cond:
                self._handlers.pop(threading.current_thread(), None)
                self._cond.notify_all()

    def _handler_failed(self, addr) -> None:
        """Called in a handler thread with an exception being handled."""
        log.exception("image host %s: the handler for %s failed", self.port, addr)
        with self._cond:
            self._errors.append(traceback.format_exc(limit=8))

    def __enter__(self) -> ImageHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # images and URLs ----------------------------------------------------------------------------
    def add(self, image_id: str, data: bytes, *, etag_of: bytes | None = None) -> str:
        """Serve ``data`` as ``image_id`` (replacing any earlier image of that id); returns its SHA-256.
        ``etag_of``: serve it under the ETag of those bytes instead — a mirror that swapped the file
        behind an unchanged ETag, so a client resuming with Range gets the new file's later bytes."""
        if not isinstance(image_id, str) or not _ID_RE.fullmatch(image_id):
            raise ValueError(f"invalid image id {image_id!r}: 1-128 of [A-Za-z0-9._-], starting alphanumeric")
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        with self._cond:
            self._images[image_id] = data
            self._digests[image_id] = digest
            self._etags[image_id] = hashlib.sha256(etag_of if etag_of is not None else data).hexdigest()
        return digest

    def remove(self, image_id: str) -> None:
        with self._cond:
            self._images.pop(image_id, None)
            self._digests.pop(image_id, None)
            self._etags.pop(image_id, None)

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
        """The requests served (of one image), in the order they ARRIVED: each is recorded when its response is
        done, and a short response to a later request can be done before a long one to an earlier."""
        with self._cond:
            return sorted((r for r in self._requests if image_id is None or r.image_id == image_id),
                          key=lambda r: r.t)

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

    def _etag(self, image_id: str, data: bytes) -> str:
        with self._cond:
            etag = self._etags.get(image_id)
        return etag or hashlib.sha256(data).hexdigest()

    def _stall_for(self, image_id: str, start: int, end: int) -> tuple[int, float] | None:
        """``(offset, hold_s)`` if this response (bytes start..end) must stall; disarms a ``once`` stall."""
        with self._cond:
            s = self._stall
            if s is None or (s.image_id is not None and s.image_id != image_id) or s.offset > end:
                return None
            if s.once:
                self._stall = None
            return max(s.offset, start), s.hold_s


class _DeadlineReader(io.RawIOBase):
    """The handler's socket, read under the deadline for the current request head (if one is set)."""

    def __init__(self, sock: socket.socket, handler: _Handler):
        self._sock = sock
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        deadline = self._handler._deadline
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete request head in time")
            self._sock.settimeout(remaining)
        return self._sock.recv_into(b)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # A request line the standard library cannot parse leaves the request's version at this default.
    # Its default, HTTP/0.9, answers without a status line (a bare HTML page): no HTTP/0.9 here, so
    # every answer, a refusal of a broken request too, starts with a status line.
    default_request_version = "HTTP/1.0"
    server_version = "cart-hil-imagehost/1"
    _deadline: float | None = None

    def log_message(self, format, *args):  # noqa: A002 - the request log replaces the stderr log
        pass

    # connection -------------------------------------------------------------------------------
    def setup(self):
        self.timeout = self.server.owner.send_timeout_s  # a send; a read of the head has its deadline
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def handle(self):
        """All requests of the connection; a client gone (or timed out) ends it quietly, anything else
        is logged and recorded by the host, never printed nor let out of the thread."""
        try:
            super().handle()
        except OSError as e:  # reset, broken pipe, timeout, the host closing
            log.debug("image host: connection %s ended: %r", self.client_address, e)
        except Exception:
            self.server.owner._handler_failed(self.client_address)
        self.close_connection = True

    def handle_one_request(self):
        # the request head must be complete within the idle timeout from now
        self._deadline = time.monotonic() + self.server.owner.idle_timeout_s
        self._t0 = None
        self._range = None
        self._ranges = []
        self.path = ""  # not the previous request's, should this one never get that far
        super().handle_one_request()

    def parse_request(self) -> bool:
        """The standard parse, then: HTTP/1.x only (an HTTP/0.9 answer would have no status line)."""
        if not super().parse_request():
            return False
        if len(self.requestline.split()) == 2:
            self.send_error(HTTPStatus.BAD_REQUEST, "no HTTP version (HTTP/0.9 is not served)")
            return False
        if not self.request_version.startswith("HTTP/1."):
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.0 or HTTP/1.1 only")
            return False
        return True

    def _head_done(self):
        self._deadline = None  # the head is in: the answer's sends have the send timeout
        self.connection.settimeout(self.server.owner.send_timeout_s)
        self._t0 = time.monotonic()
        self._wall = time.time()

    def _begin(self):
        self._head_done()
        ranges = self.headers.get_all("Range") or []
        self._ranges = ranges
        self._range = ", ".join(ranges)[:_LOG_FIELD_MAX] if ranges else None

    def send_error(self, code, message=None, explain=None):
        """The standard library's refusal of a request it cannot parse: recorded too, then sent."""
        if not str(self.request_version).startswith("HTTP/1."):
            self.request_version = "HTTP/1.0"  # an HTTP/0.9 answer would have no status line
        if self._t0 is None:
            self._head_done()
            reason = message or HTTPStatus(code).phrase
            self._log(int(code), None, 0, str(reason)[:200])
        super().send_error(code, message, explain)

    # requests ---------------------------------------------------------------------------------
    def do_GET(self):
        self._begin()
        self._serve(body=True)

    def do_HEAD(self):
        self._begin()
        self._serve(body=False)

    def _not_allowed(self):
        self._begin()
        self.close_connection = True  # its body (if any) is not read: the connection cannot go on
        self._finish_simple(405, "method not allowed", None, None, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

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
        if body:  # RFC 9110: GET is the only method with range handling; a HEAD's Range is ignored
            try:
                rng = parse_range(self._ranges, size)
            except RangeRefused as e:
                return self._finish_simple(416, str(e), image_id, body, extra={"Content-Range": f"bytes */{size}"})
            if rng is not None:
                (start, end), status = rng, 206
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{owner._etag(image_id, data)}"',
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

    def _finish_simple(self, status: int, reason: str, image_id: str | None, body: bool | None, extra=None):
        text = (reason + "\n").encode()
        # recorded before it is sent: whoever sees a refusal finds it in the log already
        self._log(status, image_id, len(text) if body is not False else 0, reason)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(text)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if body is not False:
                self.wfile.write(text)
        except OSError:
            self.close_connection = True

    def _log(self, status: int, image_id: str | None, sent: int, reason: str):
        path = getattr(self, "path", None) or ""
        self.server.owner._record(
            t=self._t0, wall=self._wall, client=f"{self.client_address[0]}:{self.client_address[1]}",
            method=self.command or "", path=path.split("?", 1)[0][:_LOG_FIELD_MAX], image_id=image_id,
            range=self._range, status=status, bytes_sent=sent, reason=reason,
            duration_s=time.monotonic() - self._t0,
        )
