"""The rack's control interface: HTTP/JSON on loopback, for what a lab sets on the bench by hand
(today: flash faults per slot). Its URL is `control` in `<run_dir>/rack.json`.

    GET    /slots/<n>/flash-faults   -> {"erase_fail": [pages], "program_fail": [pages],
                                         "bitflip": [{"page": p, "offset": o, "mask": m}]}
    PUT    /slots/<n>/flash-faults   (that document; replaces; validated) -> the faults now in force
    DELETE /slots/<n>/flash-faults   -> the empty document

Errors: 404 (no such slot or path), 405 (method), 400 (a one-line reason: bad JSON, wrong types,
a page outside the device, too many entries), 413 (body over 1 MiB), as `{"error": "<reason>"}`.
A PUT writes `<run_dir>/faults/slotNN.json` atomically (rename); the cart re-reads it at its next
flash operation. Contract: docs/interfaces.md, "Rack control interface".
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vrack.flash import FlashFaults, parse_faults

MAX_BODY = 1 << 20
_PATH_RE = re.compile(r"/slots/(\d{1,4})/flash-faults")


@dataclass(frozen=True)
class SlotFaults:
    """Where one slot's fault file is and the device it describes."""

    path: Path
    page_count: int
    page_size: int

    def read(self) -> FlashFaults:
        try:
            return parse_faults(json.loads(self.path.read_bytes()), self.page_count, self.page_size)
        except FileNotFoundError:
            return FlashFaults()
        except (OSError, ValueError):
            return FlashFaults()  # not the rack's file: the cart ignores it as well

    def write(self, faults: FlashFaults) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(faults.to_json()))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class _Handler(BaseHTTPRequestHandler):
    server: ControlServer
    protocol_version = "HTTP/1.1"
    server_version = "vrack-control/1"
    timeout = 10  # a client that stops sending mid-request is dropped

    def log_message(self, format, *args) -> None:  # noqa: A002 (the stdlib's name)
        pass

    def _reply(self, status: int, doc: dict) -> None:
        body = (json.dumps(doc) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, reason: str) -> None:
        self._reply(status, {"error": " ".join(reason.split())[:300]})

    def _slot(self) -> SlotFaults | None:
        m = _PATH_RE.fullmatch(self.path)
        slot = self.server.slots.get(int(m.group(1))) if m else None
        if slot is None:
            what = f"no slot {m.group(1)}" if m else "no such path"
            self._error(HTTPStatus.NOT_FOUND, f"{what}: /slots/<n>/flash-faults, slots "
                                              f"{', '.join(map(str, sorted(self.server.slots)))}")
        return slot

    def do_GET(self) -> None:
        slot = self._slot()
        if slot is not None:
            with self.server.lock:
                self._reply(HTTPStatus.OK, slot.read().to_json())

    def do_DELETE(self) -> None:
        slot = self._slot()
        if slot is not None:
            with self.server.lock:
                slot.clear()
            self._reply(HTTPStatus.OK, FlashFaults().to_json())

    def do_PUT(self) -> None:
        slot = self._slot()
        if slot is None:
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, "a PUT needs a Content-Length")
            return
        if int(length) > MAX_BODY:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes: at most {MAX_BODY}")
            return
        raw = self.rfile.read(int(length))
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"bad JSON: {exc}")
            return
        try:
            faults = parse_faults(doc, slot.page_count, slot.page_size)
        except ValueError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        with self.server.lock:
            slot.write(faults)
        self._reply(HTTPStatus.OK, faults.to_json())

    def _not_allowed(self) -> None:
        self.close_connection = True
        if self._slot() is not None:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command}: use GET, PUT or DELETE")

    do_POST = do_PATCH = _not_allowed  # noqa: N815 (the stdlib's names)


class ControlServer(ThreadingHTTPServer):
    """The control interface on 127.0.0.1 (port 0: a free one), in a thread of the supervisor."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, slots: dict[int, SlotFaults], host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.slots = slots
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        self._thread = threading.Thread(target=self.serve_forever, name="rack-control", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()
