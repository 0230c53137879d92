"""harness.fleet.imagehost: presigned expiring URLs, Range requests, 403/404/416, fault hooks, request log."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import pytest

from harness.fleet.imagehost import ImageHost, ImageHostError

DATA = bytes((i * 7 + 3) % 251 for i in range(100_000))


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def host(clock, tmp_path):
    h = ImageHost(clock=clock, log_path=tmp_path / "requests.jsonl")
    h.add("fw-1.6.0", DATA)
    yield h
    h.close()


def get(url: str, headers: dict | None = None, method: str = "GET", timeout: float = 5.0):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path + ("?" + parts.query if parts.query else ""), headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_presign_ttl_bounds(host):
    for bad in (59, 0, -1, 3601, float("nan"), True, "60"):
        with pytest.raises(ValueError, match="ttl"):
            host.presign("fw-1.6.0", bad)
    for ok in (60, 1800, 3600):
        assert host.presign("fw-1.6.0", ok)
    with pytest.raises(ValueError):
        host.presign("../../etc/passwd")


def test_short_ttl_needs_the_explicit_test_flag(clock):
    with ImageHost(clock=clock, allow_short_ttl_for_tests=True) as h:
        h.add("x", b"abc")
        url = h.presign("x", 0.5)
        assert get(url)[0] == 200
        clock.t += 1.01
        assert get(url)[0] == 403
        with pytest.raises(ValueError):
            h.presign("x", 3601)  # the upper bound stays


def test_whole_image_and_headers(host):
    url = host.presign("fw-1.6.0")
    assert url.startswith(host.base_url + "/images/fw-1.6.0?expires=")
    status, headers, body = get(url)
    assert status == 200 and body == DATA
    assert headers["Accept-Ranges"] == "bytes" and headers["Content-Length"] == str(len(DATA))
    assert headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    status, headers, body = get(url, method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(DATA))
    assert host.info("fw-1.6.0") == {"sha256": hashlib.sha256(DATA).hexdigest(), "size": len(DATA)}


def test_a_file_swapped_behind_an_unchanged_etag(host):
    """The fault a resuming client must survive: new bytes, the old file's ETag."""
    other = bytes(b ^ 0x5A for b in DATA)
    host.add("fw-1.6.0", other, etag_of=DATA)
    status, headers, body = get(host.presign("fw-1.6.0"), headers={"Range": "bytes=10-19"})
    assert status == 206 and body == other[10:20]
    assert headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    host.add("fw-1.6.0", other)  # added again without: its own ETag
    assert get(host.presign("fw-1.6.0"))[1]["ETag"] == f'"{hashlib.sha256(other).hexdigest()}"'


@pytest.mark.parametrize(
    ("rng", "start", "end"),
    [("bytes=0-99", 0, 99), ("bytes=99990-", 99990, 99999), ("bytes=-10", 99990, 99999),
     ("bytes=500-200000", 500, 99999), ("bytes=-200000", 0, 99999), ("bytes=5-5", 5, 5),
     ("BYTES=0-9", 0, 9), ("bytes= 0-9 ", 0, 9), ("bytes=0-9,", 0, 9), ("bytes=,,10-19", 10, 19),
     ("bytes=0-99999999999999999999", 0, 99999), ("bytes=-99999999999999999999", 0, 99999),
     ("bytes=000010-000019", 10, 19), ("bytes=0-" + "9" * 5000, 0, 99999)],
)
def test_range_requests(host, rng, start, end):
    status, headers, body = get(host.presign("fw-1.6.0"), {"Range": rng})
    assert status == 206 and body == DATA[start:end + 1]
    assert headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"


# RFC 9110 14.2: "A server that supports range requests MAY ignore or reject a Range header field that
# contains an invalid ranges-specifier": this host rejects (416), so a broken client sees it.
@pytest.mark.parametrize(
    ("rng", "why"),
    [("bytes=100000-", "range not satisfiable: starts at or past the end"),
     ("bytes=200000-300000", "range not satisfiable: starts at or past the end"),
     ("bytes=99999999999999999999-", "range not satisfiable: starts at or past the end"),
     ("bytes=" + "9" * 5000 + "-", "range not satisfiable: starts at or past the end"),  # > int's 4300 digits
     ("bytes=-0", "range not satisfiable: bytes=-0"),
     ("bytes=10-5", "invalid range '10-5': last before first"),
     ("bytes=5-2", "invalid range '5-2': last before first"),
     ("bytes=99999999999999999999-5", "invalid range '99999999999999999999-5': last before first"),
     ("bytes=abc", "invalid range 'abc'"),
     ("bytes=-", "invalid range '-'"),
     ("bytes=", "invalid range: no range in bytes="),
     ("bytes=,", "invalid range: no range in bytes="),
     ("bytes=1-2-3", "invalid range '1-2-3'"),
     ("bytes=+1-5", "invalid range '+1-5'"),
     ("bytes=-1-5", "invalid range '-1-5'"),
     ("bytes=0x10-", "invalid range '0x10-'"),
     ("bytes=1 - 5", "invalid range '1 - 5'"),
     ("bytes=\xb2-", "invalid range '\xb2-'"),  # a Latin-1 superscript two is no digit
     ("bytes=0-1,abc", "invalid range 'abc'")],
)
def test_a_refused_range_is_416_with_the_size_and_the_host_serves_on(host, rng, why):
    url = host.presign("fw-1.6.0")
    status, headers, body = get(url, {"Range": rng})
    assert (status, headers["Content-Range"], body.decode()) == (416, f"bytes */{len(DATA)}", why + "\n")
    req = host.wait_request(lambda r: r.status == 416, 2)
    assert req.reason == why and req.range == rng[:2048] and req.bytes_sent == len((why + "\n").encode())
    assert get(url)[0::2] == (200, DATA)  # a good request right after
    assert host.handler_errors() == []


def test_two_range_fields_are_refused(host):
    parts = urlsplit(host.presign("fw-1.6.0"))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.putrequest("GET", parts.path + "?" + parts.query)
        conn.putheader("Range", "bytes=0-9")
        conn.putheader("Range", "bytes=10-19")
        conn.endheaders()
        r = conn.getresponse()
        assert (r.status, r.getheader("Content-Range"), r.read()) == (
            416, f"bytes */{len(DATA)}", b"more than one Range header field\n")
    finally:
        conn.close()


# RFC 9110 14.2: "An origin server MUST ignore a Range header field that contains a range unit it does not
# understand"; "A server MAY ignore the Range header field" (this host sends no multipart/byteranges).
@pytest.mark.parametrize("rng", ["bytes=0-1,5-6", "bytes=0-1, 200000-300000", "items=0-5", "bytes 0-5", "0-5",
                                 "", "bytes0-5", "bytes = 0-5", ",".join(["bytes=0-1"] + ["2-3"] * 5000)])
def test_a_range_header_that_is_not_one_byte_range_is_ignored(host, rng):
    status, headers, body = get(host.presign("fw-1.6.0"), {"Range": rng})
    assert status == 200 and body == DATA and "Content-Range" not in headers


def test_a_head_ignores_range(host):
    """RFC 9110 14.2: GET is the only method for which range handling is defined."""
    url = host.presign("fw-1.6.0")
    for rng in ("bytes=0-9", "bytes=abc", "bytes=200000-"):
        status, headers, body = get(url, {"Range": rng}, method="HEAD")
        assert (status, headers["Content-Length"], body) == (200, str(len(DATA)), b"")
        assert "Content-Range" not in headers


def test_an_empty_image_has_no_satisfiable_range(host):
    host.add("empty", b"")
    url = host.presign("empty")
    status, headers, body = get(url)
    assert (status, headers["Content-Length"], body) == (200, "0", b"")
    for rng in ("bytes=0-", "bytes=-5", "bytes=0-0"):
        status, headers, body = get(url, {"Range": rng})
        assert (status, headers["Content-Range"]) == (416, "bytes */0"), rng
        assert body == b"range not satisfiable: the image is empty\n"


def test_resume_across_ranges_reassembles_the_image(host):
    url = host.presign("fw-1.6.0")
    got, pos = b"", 0
    while pos < len(DATA):
        status, _, body = get(url, {"Range": f"bytes={pos}-{pos + 32767}"})
        assert status == 206
        got += body
        pos += len(body)
    assert got == DATA
    host.wait_request(lambda r: r.index == 3, 2)
    assert [r.bytes_sent for r in host.requests("fw-1.6.0")] == [32768, 32768, 32768, 1696]


def test_bad_signatures_are_403_with_the_reason(host, clock):
    url = host.presign("fw-1.6.0")
    base, query = url.split("?")
    q = dict(p.split("=") for p in query.split("&"))
    cases = {
        "missing signature": base,
        "missing signature ": f"{base}?expires={q['expires']}",
        "bad signature": f"{base}?expires={q['expires']}&sig={'0' * 64}",
        "bad signature ": f"{base}?expires={int(q['expires']) + 100}&sig={q['sig']}",
        "bad signature  ": f"{host.base_url}/images/other?expires={q['expires']}&sig={q['sig']}",
        "bad signature   ": f"{base}?expires=-5&sig={q['sig']}",
    }
    for reason, u in cases.items():
        status, _, body = get(u)
        assert (status, body.decode().strip()) == (403, reason.strip()), u
    clock.t += 1801
    assert get(url)[0:3:2] == (403, b"expired\n")


def test_unknown_image_and_path_are_404_and_other_methods_405(host):
    assert get(host.presign("nope"))[0] == 404
    assert get(host.base_url + "/other")[0] == 404
    assert get(host.base_url + "/images/a/b")[0] == 404
    assert get(host.presign("fw-1.6.0"), method="POST")[0] == 405
    host.remove("fw-1.6.0")
    assert get(host.presign("fw-1.6.0"))[0] == 404


def test_expiry_is_checked_on_every_range_request(host, clock):
    """A download that spans the expiry fails on its next range; a fresh URL resumes it."""
    url = host.presign("fw-1.6.0", 60)
    status, _, first = get(url, {"Range": "bytes=0-49999"})
    assert status == 206
    clock.t += 61
    assert get(url, {"Range": "bytes=50000-"})[0] == 403
    status, _, rest = get(host.presign("fw-1.6.0", 60), {"Range": "bytes=50000-"})
    assert status == 206 and first + rest == DATA


def test_throttle_paces_the_body(host):
    host.throttle(400_000)
    t0 = time.monotonic()
    status, _, body = get(host.presign("fw-1.6.0"))  # 100 kB at 400 kB/s: 0.25 s
    took = time.monotonic() - t0
    assert status == 200 and body == DATA and 0.2 <= took < 2.0, took
    host.throttle(None)
    with pytest.raises(ValueError):
        host.throttle(0)


def test_stall_after_holds_then_drops_the_connection_and_a_resume_works(host):
    host.stall_after(30_000, image_id="fw-1.6.0")
    url = host.presign("fw-1.6.0")
    result: dict = {}

    def download():
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        conn.request("GET", parts.path + "?" + parts.query)
        r = conn.getresponse()
        result["length"] = int(r.getheader("Content-Length"))
        buf = b""
        try:
            while chunk := r.read(4096):
                buf += chunk
        except http.client.IncompleteRead as e:
            buf += e.partial
            result["error"] = e
        result["body"] = buf
        conn.close()

    t = threading.Thread(target=download)
    t.start()
    host.wait_stalled(5)
    assert t.is_alive()  # the client is still waiting for data
    host.release()
    t.join(5)
    assert result["body"] == DATA[:30_000] and result["length"] == len(DATA)  # cut short
    req = host.wait_request(lambda r: "stalled" in r.reason, 2)
    assert req.bytes_sent == 30_000 and req.status == 200
    status, _, rest = get(url, {"Range": "bytes=30000-"})  # once: disarmed
    assert status == 206 and DATA[:30_000] + rest == DATA


def test_stall_hold_time_bounds_the_stall(host):
    host.stall_after(0, hold_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(http.client.IncompleteRead):
        get(host.presign("fw-1.6.0"))
    assert 0.15 <= time.monotonic() - t0 < 3


def test_request_log_and_waits(host, tmp_path):
    url = host.presign("fw-1.6.0")
    get(url, {"Range": "bytes=0-9"})
    get(host.presign("missing"))
    host.wait_request(lambda r: r.status == 206, 2)  # a transfer is logged when it ends
    host.wait_request(lambda r: r.status == 404, 2)
    # a refusal is logged before it is sent, a transfer when it ends: either may come first
    reqs = sorted(host.requests(), key=lambda r: r.status)
    assert [(r.status, r.bytes_sent, r.range) for r in reqs] == [(206, 10, "bytes=0-9"), (404, 14, None)]
    assert reqs[0].path == "/images/fw-1.6.0" and reqs[0].client.startswith("127.0.0.1:")
    lines = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert sorted(x["status"] for x in lines) == [206, 404]
    with pytest.raises(ImageHostError) as e:
        host.wait_request(lambda r: r.status == 403, 0.05, what="a 403")
    assert "a 403" in str(e.value) and "-> 404" in str(e.value)
    with pytest.raises(ImageHostError, match="stall"):
        host.wait_stalled(0.01)


def test_parallel_downloads(host):
    url = host.presign("fw-1.6.0")
    out = []
    threads = [threading.Thread(target=lambda: out.append(get(url)[2])) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == [DATA] * 10


def test_close_is_prompt_and_idempotent(clock):
    h = ImageHost(clock=clock)
    t0 = time.monotonic()
    h.close()
    h.close()
    assert time.monotonic() - t0 < 0.5
