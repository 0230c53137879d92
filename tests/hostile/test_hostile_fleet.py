"""A hostile client against the image host (harness.fleet.imagehost): malformed requests, absurd Range
headers, idle and half-sent connections, a close() under load, and arbitrary bytes from hypothesis.

What every test holds the host to: it answers with an HTTP status (or closes the connection), never
lets an exception out of a handler thread (nothing on stderr, nothing in ``handler_errors()``, no
ERROR logged), leaves no handler thread behind once the client is gone, and serves a good request
right afterwards. Waits are on events (a socket read returning ``b""``, a connection count reached),
each with a deadline.
"""

from __future__ import annotations

import http.client
import logging
import select
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.fleet.imagehost import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_SEND_TIMEOUT_S, ImageHost

DATA = bytes((i * 13 + 5) % 256 for i in range(100_000))
SMALL = bytes(range(256)) * 4
DEADLINE = 5.0


def handler_threads(host: ImageHost) -> list[threading.Thread]:
    """Every thread of this host's connections, as the interpreter sees them."""
    prefix = f"imagehost:{host.port}:"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def good_get(host: ImageHost, image_id: str, data: bytes) -> None:
    parts = urlsplit(host.presign(image_id))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=DEADLINE)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, data)
    finally:
        conn.close()


def raw_exchange(host: ImageHost, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send ``payload`` on a fresh connection (then end our side), read until the host closes it."""
    with socket.create_connection(("127.0.0.1", host.port), timeout=DEADLINE) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + DEADLINE
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break  # the host dropped it with our unread bytes in its buffer: a close too
            if not chunk:
                break
            out += chunk
        return out


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1."):
        return None
    return int(reply.split(b" ", 2)[1])


def assert_clean(host: ImageHost, capfd, caplog) -> None:
    """No handler left, none failed, nothing printed, nothing logged as an error."""
    host.wait_open_connections(0, DEADLINE)
    assert handler_threads(host) == []
    assert host.handler_errors() == []
    err = capfd.readouterr().err
    assert err == "", err
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.fixture
def host(tmp_path):
    h = ImageHost(log_path=tmp_path / "requests.jsonl", idle_timeout_s=2.0)
    h.add("fw", DATA)
    h.add("small", SMALL)
    yield h
    h.close()
    assert handler_threads(h) == []


def _path(host: ImageHost, image_id: str = "fw") -> str:
    parts = urlsplit(host.presign(image_id))
    return f"{parts.path}?{parts.query}"


# --------------------------------------------------------------------------------------------------
# malformed requests and absurd headers


MALFORMED = {
    # name: (request bytes with {path} for a good presigned path, the status the host answers)
    "garbage line": (b"\x00\x01\x02 garbage\r\n\r\n", 400),
    "bad version": (b"GET {path} HTTP/x.y\r\n\r\n", 400),
    "one word": (b"GET\r\n\r\n", 400),
    "HTTP/0.9 POST": (b"POST {path}\r\n\r\n", 400),
    "HTTP/0.9 GET": (b"GET {path}\r\n\r\n", 400),
    "explicit HTTP/0.9": (b"GET {path} HTTP/0.9\r\n\r\n", 505),
    "HTTP/0.9, 4 words": (b"GET /a\xa0b HTTP/0.9\r\n\r\n", 400),  # Latin-1 NBSP splits a word
    "HTTP/1.5": (b"GET {path} HTTP/1.5\r\nRange: bytes=0-0\r\n\r\n", 206),
    "version 2": (b"GET {path} HTTP/2.0\r\n\r\n", 505),
    "unknown method": (b"BREW {path} HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    "post with a body": (b"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", 405),
    "absurd content-length": (b"PUT {path} HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 405),
    "request line of 70 KiB": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    "header line of 70 KiB": (b"GET {path} HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
    "Range of 70 KiB": (b"GET {path} HTTP/1.1\r\nRange: bytes=" + b"0-1," * 17_500 + b"\r\n\r\n", 431),
    "101 headers": (b"GET {path} HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
    "Range with 5000 digits": (b"GET {path} HTTP/1.1\r\nRange: bytes=" + b"7" * 5000 + b"-\r\n\r\n", 416),
    "Range of 60 KiB, valid ranges": (b"GET {path} HTTP/1.1\r\nRange: bytes=" + b"0-1," * 15_000 + b"0-1\r\n\r\n", 200),
    "Range with NUL and 8-bit bytes": (b"GET {path} HTTP/1.1\r\nRange: bytes=\x00\xff-\x80\r\n\r\n", 416),
    "two Range fields": (b"GET {path} HTTP/1.1\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n", 416),
    "Range then a folded line": (b"GET {path} HTTP/1.1\r\nRange: bytes=0-1\r\n  ,5-6\r\n\r\n", 200),
    "no headers end (EOF)": (b"GET {path} HTTP/1.1\r\nRange: bytes=0-9\r\n", 206),
    "bad path encoding": (b"GET /images/%ff%00?expires=1&sig=2 HTTP/1.1\r\n\r\n", 403),
    "bracket in path": (b"GET http://[::1/x HTTP/1.1\r\n\r\n", 404),
    "Expect 100-continue": (b"GET {path} HTTP/1.1\r\nExpect: 100-continue\r\nRange: bytes=0-0\r\n\r\n", 100),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_request_gets_a_status_and_leaves_nothing_behind(host, capfd, caplog, name):
    caplog.set_level(logging.DEBUG, logger="harness.fleet.imagehost")
    template, expected = MALFORMED[name]
    reply = raw_exchange(host, template.replace(b"{path}", _path(host).encode()))
    assert status_of(reply) == expected, reply[:200]
    if expected in (400, 414, 431, 501, 505):  # the standard library's refusals are recorded too
        req = host.wait_request(lambda r: r.status == expected, 2)
        assert req.image_id is None and req.bytes_sent == 0
    if expected == 416:
        assert b"Content-Range: bytes */100000\r\n" in reply
    good_get(host, "fw", DATA)
    assert_clean(host, capfd, caplog)


def test_a_client_that_resets_mid_answer_leaves_nothing_behind(host, capfd, caplog):
    """The host's write fails (reset by peer) in the middle of a transfer and of a refusal."""
    host.throttle(200_000)  # the transfer is still going when the reset comes
    for rng in ("bytes=0-", "bytes=abc"):
        s = socket.create_connection(("127.0.0.1", host.port), timeout=DEADLINE)
        s.sendall(f"GET {_path(host)} HTTP/1.1\r\nRange: {rng}\r\n\r\n".encode())
        assert s.recv(12).startswith(b"HTTP/1.1 ")  # the answer has begun
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        s.close()
    req = host.wait_request(lambda r: r.status == 206, DEADLINE)
    assert req.bytes_sent < len(DATA) and req.reason.startswith("client gone"), req
    host.throttle(None)
    good_get(host, "fw", DATA)
    assert_clean(host, capfd, caplog)


# --------------------------------------------------------------------------------------------------
# idle and half-sent connections


def _closed_by_host_within(s: socket.socket, bound: float) -> float:
    """Seconds until the host closes ``s`` (recv returns b"", or a reset); fails past ``bound``."""
    t0 = time.monotonic()
    s.settimeout(bound)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the host did not close an idle connection within {bound}s")
    return time.monotonic() - t0


def test_the_default_idle_timeout_is_a_few_seconds_and_validated():
    assert 1.0 <= DEFAULT_IDLE_TIMEOUT_S <= 10.0 and DEFAULT_SEND_TIMEOUT_S >= DEFAULT_IDLE_TIMEOUT_S
    for name in ("idle_timeout_s", "send_timeout_s"):
        for bad in (0, -1, float("nan"), float("inf"), True, "5"):
            with pytest.raises(ValueError, match=name):
                ImageHost(**{name: bad})
    with ImageHost() as h:
        assert (h.idle_timeout_s, h.send_timeout_s) == (DEFAULT_IDLE_TIMEOUT_S, DEFAULT_SEND_TIMEOUT_S)


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(capfd):
    big = bytes(16 * 1024 * 1024)  # more than the socket buffers of both ends hold
    with ImageHost(idle_timeout_s=5.0, send_timeout_s=0.5) as h:
        h.add("big", big)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(DEADLINE)
        s.connect(("127.0.0.1", h.port))
        try:
            s.sendall(f"GET {_path(h, 'big')} HTTP/1.1\r\n\r\n".encode())
            assert s.recv(12) == b"HTTP/1.1 200"  # ... and then it reads no more
            req = h.wait_request(lambda r: r.image_id == "big", 10)
            assert req.reason == "client gone: TimeoutError" and 0 < req.bytes_sent < len(big), req
            assert 0.4 <= req.duration_s < 5.0, req
        finally:
            s.close()
        h.wait_open_connections(0, DEADLINE)
    assert capfd.readouterr().err == "" and h.handler_errors() == []


@pytest.mark.parametrize("sent", [b"", b"GET /images/fw?expires=1&sig=2 HTTP/1.1\r\nHost: a\r\n", b"GE"])
def test_an_idle_or_half_sent_connection_is_closed_after_the_timeout(capfd, caplog, sent):
    with ImageHost(idle_timeout_s=0.5) as h:
        h.add("fw", DATA)
        with socket.create_connection(("127.0.0.1", h.port), timeout=DEADLINE) as s:
            s.sendall(sent)
            t0 = time.monotonic()
            took = _closed_by_host_within(s, 3.0)
        assert took >= 0.4, took  # not before the timeout ...
        assert time.monotonic() - t0 < 3.0
        assert h.requests() == []  # nothing was answered
        good_get(h, "fw", DATA)
        assert_clean(h, capfd, caplog)


def test_a_client_trickling_its_request_is_cut_off_at_the_bound():
    """One byte every 0.1 s never leaves the connection idle for 0.5 s; the head must still be complete
    within 0.5 s of the connection opening."""
    with ImageHost(idle_timeout_s=0.5) as h:
        h.add("fw", DATA)
        request = f"GET {_path(h)} HTTP/1.1\r\nX-Slow: {'s' * 200}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", h.port), timeout=DEADLINE) as s:
            t0 = time.monotonic()
            closed = False
            for b in request:
                try:
                    s.send(bytes([b]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                # the pace of a slow client; a readable socket here means the host closed it
                readable, _, _ = select.select([s], [], [], 0.1)
                if readable:
                    try:
                        closed = s.recv(1) == b""
                    except ConnectionResetError:
                        closed = True
                    break
            took = time.monotonic() - t0
        assert closed, "the host answered a request that took longer than the idle timeout to arrive"
        assert 0.4 <= took < 2.0, took
        assert h.requests() == []


def test_a_keep_alive_connection_is_closed_after_the_timeout():
    with ImageHost(idle_timeout_s=0.5) as h:
        h.add("small", SMALL)
        parts = urlsplit(h.presign("small"))
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=DEADLINE)
        conn.request("GET", f"{parts.path}?{parts.query}")
        r = conn.getresponse()
        assert (r.status, r.read(), r.getheader("Connection")) == (200, SMALL, None)  # kept alive
        took = _closed_by_host_within(conn.sock, 3.0)
        conn.close()
        assert 0.4 <= took < 3.0, took
        h.wait_open_connections(0, DEADLINE)


# --------------------------------------------------------------------------------------------------
# close() under load


def test_close_with_idle_half_sent_slow_and_stalled_clients_is_prompt_and_leaves_no_thread(capfd, caplog):
    h = ImageHost(idle_timeout_s=30.0)  # the idle timeout does not come to the rescue here
    h.add("fw", DATA)
    h.add("small", SMALL)
    h.throttle(20_000)  # 100 kB takes 5 s
    h.stall_after(100, image_id="small", hold_s=30.0)
    url = h.presign("fw")
    results: dict[str, object] = {}
    started = threading.Event()

    def slow_download():
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=DEADLINE)
        got = b""
        try:
            conn.request("GET", f"{parts.path}?{parts.query}")
            r = conn.getresponse()
            results["status"] = r.status
            while chunk := r.read(1000):
                got += chunk
                started.set()
        except (http.client.IncompleteRead, OSError) as e:
            results["error"] = e
        finally:
            results["got"] = len(got)
            conn.close()

    downloader = threading.Thread(target=slow_download)
    downloader.start()
    idle = socket.create_connection(("127.0.0.1", h.port), timeout=DEADLINE)
    half = socket.create_connection(("127.0.0.1", h.port), timeout=DEADLINE)
    half.sendall(b"GET /images/fw HTTP/1.1\r\nHost: a\r\n")
    stalled = socket.create_connection(("127.0.0.1", h.port), timeout=DEADLINE)
    stalled.sendall(f"GET {_path(h, 'small')} HTTP/1.1\r\n\r\n".encode())
    try:
        assert started.wait(DEADLINE), "the slow download never started"
        h.wait_stalled(DEADLINE)
        h.wait_open_connections(4, DEADLINE)
        assert len(handler_threads(h)) == 4

        t0 = time.monotonic()
        h.close()
        took = time.monotonic() - t0
        assert took < 1.0, took
        assert handler_threads(h) == [] and h.open_connections() == 0
        assert not any(t.name == f"imagehost:{h.port}" for t in threading.enumerate())  # the accept loop too
        for s in (idle, half):
            assert _closed_by_host_within(s, 2.0) < 2.0
        downloader.join(DEADLINE)
        assert not downloader.is_alive()
        assert results["status"] == 200 and 0 < results["got"] < len(DATA), results
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", h.port), timeout=1).close()
    finally:
        for s in (idle, half, stalled):
            s.close()
        h.close()
    assert h.handler_errors() == []
    assert capfd.readouterr().err == ""
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# --------------------------------------------------------------------------------------------------
# arbitrary requests


_METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "BREW", "get", ""]) | st.text(
    st.characters(min_codepoint=33, max_codepoint=126), max_size=8)
_VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x", "HTTP/", "", "http/1.1"])
_NAMES = st.sampled_from(["Range", "range", "Host", "Connection", "Expect", "Content-Length", "Transfer-Encoding",
                          "If-Range", "X-Any"]) | st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                           min_size=1, max_size=12)
_RANGE_VALUES = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(-5, 2**70).map(str) | st.just(""),
              st.integers(-5, 2**70).map(str) | st.just("")),
    st.builds(lambda xs: "bytes=" + ",".join(xs), st.lists(st.text("0123456789-, ", max_size=8), max_size=6)),
    st.sampled_from(["keep-alive", "close", "100-continue", "chunked", "0", "-1", "99999999999999999999"]),
)
_VALUES = _RANGE_VALUES.map(str.encode) | st.binary(max_size=120)


@st.composite
def _requests(draw, good_path: str) -> bytes:
    method = draw(_METHODS)
    path = draw(st.sampled_from([good_path, "/images/small", "/", "*", ""]) | st.text(max_size=40))
    version = draw(_VERSIONS)
    line = draw(st.sampled_from([f"{method} {path} {version}", f"{method} {path}", method]) | st.text(max_size=60))
    head = line.encode("utf-8", "surrogatepass") + b"\r\n"
    for name, value in draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=6)):
        head += name.encode() + b": " + value + b"\r\n"
    end = draw(st.sampled_from([b"\r\n", b"", b"\n", b"\r\n\r\n"]))
    return head + end + draw(st.binary(max_size=40))


def test_arbitrary_requests_get_a_status_or_a_close_and_never_break_the_host(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="harness.fleet.imagehost")
    with ImageHost(idle_timeout_s=2.0) as h:
        h.add("small", SMALL)
        good_path = _path(h, "small")

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(_requests(good_path))
        def one(payload: bytes) -> None:
            reply = raw_exchange(h, payload)
            if reply:  # no HTTP/0.9 here: every answer starts with a status line
                status = status_of(reply)
                assert status is not None and 100 <= status <= 599, reply[:120]
            good_get(h, "small", SMALL)

        one()
        h.wait_open_connections(0, DEADLINE)
        assert handler_threads(h) == [] and h.handler_errors() == []
        assert len(h.requests()) >= 150  # every good request was served and recorded
    assert capfd.readouterr().err == ""
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
