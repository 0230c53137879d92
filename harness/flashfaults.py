"""Flash faults on a cart, set through the rack's control interface (HTTP/JSON), in the cart's words.

    control = RackControl.for_rig(rig)             the rack's control interface (None: the rig has none)
    faults = control.cart(cart)                    one cart's faults (the `flash_faults` fixture)
    page = faults.inactive_page(k)                 page k of the slot the cart does not run from, absolute
    page = faults.page("B", k)                     page k of slot B, absolute
    faults.set(erase_fail=[page])                  replaces the cart's faults; in force at its next flash op
    faults.set(bitflip=[BitFlip(page, offset=100, mask=0x01)])
    faults.get() / faults.clear()

The interface is the rack's (docs/interfaces.md, "Rack control interface"): GET/PUT/DELETE
`/slots/<n>/flash-faults` on the URL a virtual rack publishes as "control" in `<run_dir>/rack.json`.
A lab rig has no such interface (nobody makes a real part fail on request): `for_rig` gives None and
the suites skip, saying the rig cannot inject flash faults.

Pages are absolute page indexes of the cart's flash. The layout is a published interface
(docs/flash-layout.md) re-derived here from the cart's geometry (`CartConfig.flash`), never imported
from the rack: BCB copies at pages 0 and 1, slot A from page 2, slot B after it, then the trust store
(4 pages: two copies of 2), the fleet settings (2 pages) and the device state (2 pages).

Every error is one line naming the rack's URL, the slot and the cart, and ends with the rack's own
one-line reason where it gave one.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.cart import Cart
    from harness.config import FlashGeometry, Rig

SLOTS = ("A", "B")
BCB_PAGES = 2
TRUST_PAGES = 4
SETTINGS_PAGES = 2
STATE_PAGES = 2


class FlashFaultError(Exception):
    """The rack refused or could not be reached; one line: where, which slot, the rack's reason."""


# ---------------------------------------------------------------- the layout (docs/flash-layout.md)


@dataclass(frozen=True)
class FlashLayout:
    """Page indexes of a cart's flash for its page size P and slot size S (docs/flash-layout.md)."""

    page_size: int
    slot_size: int

    @classmethod
    def of(cls, geometry: FlashGeometry) -> FlashLayout:
        return cls(geometry.page_size, geometry.slot_size)

    @property
    def slot_pages(self) -> int:
        return self.slot_size // self.page_size

    @property
    def page_count(self) -> int:
        """Pages of the whole device: 10 + 2 S/P."""
        return BCB_PAGES + 2 * self.slot_pages + TRUST_PAGES + SETTINGS_PAGES + STATE_PAGES

    def bcb_page(self, copy: int) -> int:
        if copy not in (0, 1):
            raise ValueError(f"boot control copy {copy!r}: there are copies 0 and 1")
        return copy

    def slot_first_page(self, slot: str) -> int:
        if slot not in SLOTS:
            raise ValueError(f"slot {slot!r}: the slots are A and B")
        return BCB_PAGES + SLOTS.index(slot) * self.slot_pages

    def slot_page(self, slot: str, k: int) -> int:
        """Absolute index of page `k` (0-based) of `slot`."""
        if type(k) is not int or not 0 <= k < self.slot_pages:
            raise ValueError(f"page {k!r} of slot {slot}: a slot has pages 0..{self.slot_pages - 1}")
        return self.slot_first_page(slot) + k

    @property
    def trust_first_page(self) -> int:
        return BCB_PAGES + 2 * self.slot_pages

    @property
    def settings_first_page(self) -> int:
        return self.trust_first_page + TRUST_PAGES

    @property
    def state_first_page(self) -> int:
        return self.settings_first_page + SETTINGS_PAGES

    def pages_for(self, nbytes: int) -> int:
        """Pages an image of `nbytes` occupies (the pages the agent erases and writes)."""
        return -(-nbytes // self.page_size)

    def region_of(self, page: int) -> str:
        """Which region an absolute page is in, in the lab's words (for messages)."""
        if not 0 <= page < self.page_count:
            return f"outside the device (pages 0..{self.page_count - 1})"
        if page < BCB_PAGES:
            return f"boot control copy {page}"
        for slot in SLOTS:
            first = self.slot_first_page(slot)
            if first <= page < first + self.slot_pages:
                return f"page {page - first} of slot {slot}"
        if page < self.settings_first_page:
            return f"page {page - self.trust_first_page} of the trust store"
        if page < self.state_first_page:
            return f"page {page - self.settings_first_page} of the fleet settings"
        return f"page {page - self.state_first_page} of the device state"


# ---------------------------------------------------------------- the fault document


@dataclass(frozen=True)
class BitFlip:
    """Reads of byte `offset` of `page` return it XOR `mask` (the stored byte is unchanged)."""

    page: int
    offset: int = 0
    mask: int = 0x01

    def to_json(self) -> dict:
        return {"page": self.page, "offset": self.offset, "mask": self.mask}


@dataclass(frozen=True)
class FlashFaults:
    """The faults in force on one slot of the rack, as its control interface answers them."""

    erase_fail: tuple[int, ...] = ()
    program_fail: tuple[int, ...] = ()
    bitflip: tuple[BitFlip, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.erase_fail or self.program_fail or self.bitflip)

    def to_json(self) -> dict:
        return {"erase_fail": list(self.erase_fail), "program_fail": list(self.program_fail),
                "bitflip": [b.to_json() for b in self.bitflip]}

    @classmethod
    def from_json(cls, doc: object) -> FlashFaults:
        """The rack's answer; ValueError if it is not the documented shape."""
        if not isinstance(doc, dict) or set(doc) - {"erase_fail", "program_fail", "bitflip"}:
            raise ValueError(f"not a flash-fault document: {str(doc)[:120]}")

        def pages(key: str) -> tuple[int, ...]:
            v = doc.get(key, [])
            if not isinstance(v, list) or any(type(p) is not int for p in v):
                raise ValueError(f"{key}: not a list of pages: {str(v)[:120]}")
            return tuple(v)

        flips = doc.get("bitflip", [])
        if not isinstance(flips, list):
            raise ValueError(f"bitflip: not a list: {str(flips)[:120]}")
        try:
            bits = tuple(BitFlip(int(f["page"]), int(f["offset"]), int(f["mask"])) for f in flips)
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"bitflip: not a list of {{page, offset, mask}}: {str(flips)[:120]}") from None
        return cls(pages("erase_fail"), pages("program_fail"), bits)


# ---------------------------------------------------------------- the HTTP client


class RackControl:
    """Client of a rack's control interface (docs/interfaces.md, "Rack control interface")."""

    def __init__(self, url: str, *, timeout: float = 10.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise FlashFaultError(f"rack control interface {url!r}: not an http://host:port URL")
        self.url = url.rstrip("/")
        self.timeout = timeout

    @classmethod
    def for_rig(cls, rig: Rig, *, timeout: float = 10.0) -> RackControl | None:
        """The control interface of the rig's live rack; None on a rig that has none (a lab rig).
        A virtual rig whose rack is down, or does not publish one, is an error, not a capability."""
        if not rig.is_virtual:
            return None
        from harness.rackctl import rack_state

        state = rack_state(rig)
        if state is None:
            raise FlashFaultError(f"{rig.path}: no live rack in {rig.run_dir}: its control interface cannot be reached")
        url = state.get("control")
        if not isinstance(url, str) or not url:
            raise FlashFaultError(f"{rig.path}: the rack in {rig.run_dir} publishes no control interface "
                                  f"(no 'control' in rack.json): a rack older than this harness?")
        return cls(url, timeout=timeout)

    def cart(self, cart: Cart) -> CartFlashFaults:
        """One cart's faults, in its slot, with its geometry; "the inactive slot" asked of the cart."""
        return CartFlashFaults(self, cart.slot.number, cart.id, cart.config.flash,
                               booted=lambda: cart.slot_status().booted)

    # the three requests: each answers the faults now in force on that slot
    def get(self, slot: int, *, label: str | None = None) -> FlashFaults:
        return self._call("GET", slot, None, label)

    def put(self, slot: int, faults: FlashFaults, *, label: str | None = None) -> FlashFaults:
        return self._call("PUT", slot, faults.to_json(), label)

    def delete(self, slot: int, *, label: str | None = None) -> FlashFaults:
        return self._call("DELETE", slot, None, label)

    def _call(self, method: str, slot: int, doc: dict | None, label: str | None) -> FlashFaults:
        where = f"rack control {self.url}: slot {slot}" + (f" ({label})" if label else "")
        what = {"GET": "reading", "PUT": "setting", "DELETE": "clearing"}[method]
        body = json.dumps(doc).encode() if doc is not None else None
        req = urllib.request.Request(f"{self.url}/slots/{int(slot)}/flash-faults", data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise FlashFaultError(f"{where}: {what} flash faults refused (HTTP {exc.code}): "
                                  f"{_reason(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", None) or exc
            raise FlashFaultError(f"{where}: {what} flash faults: the rack's control interface cannot be "
                                  f"reached: {_one_line(str(why))}") from None
        try:
            return FlashFaults.from_json(json.loads(raw))
        except ValueError as exc:
            raise FlashFaultError(f"{where}: {what} flash faults: unexpected answer: {_one_line(str(exc))}") from None


def _reason(exc: urllib.error.HTTPError) -> str:
    """The rack's one-line `{"error": ...}`, else the HTTP reason phrase."""
    try:
        doc = json.loads(exc.read(4096))
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return _one_line(doc["error"])
    except (OSError, ValueError):
        pass
    return _one_line(str(exc.reason))


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


# ---------------------------------------------------------------- one cart's faults


class CartFlashFaults:
    """The flash faults of one cart (its rig slot), in the cart's terms: slots, pages of a slot, the
    slot it does not run from. What the `flash_faults` fixture yields; cleared in its teardown."""

    def __init__(self, control: RackControl, slot: int, cart_id: str, geometry: FlashGeometry, *,
                 booted: Callable[[], str] | None = None):
        self.control = control
        self.slot = slot
        self.cart_id = cart_id
        self.layout = FlashLayout.of(geometry)
        self._booted = booted

    # ---- where
    def page(self, slot: str, k: int) -> int:
        """Absolute index of page `k` of cart slot `slot` ("A"/"B")."""
        return self.layout.slot_page(slot, k)

    def inactive_slot(self) -> str:
        """The slot the cart is not running from (asked of the cart: `slot status`)."""
        if self._booted is None:
            raise FlashFaultError(f"{self.cart_id}: the inactive slot: no way to ask the cart which slot it runs")
        booted = self._booted()
        if booted not in SLOTS:
            raise FlashFaultError(f"{self.cart_id}: the inactive slot: the cart says it runs slot {booted!r}")
        return "B" if booted == "A" else "A"

    def inactive_page(self, k: int, *, running: str | None = None) -> int:
        """Absolute index of page `k` of the inactive slot (`running`: the slot the cart runs, if known)."""
        slot = ("B" if running == "A" else "A") if running in SLOTS else self.inactive_slot()
        return self.page(slot, k)

    def image_pages(self, image: bytes | int) -> int:
        """Pages an image takes in a slot (the pages the agent erases, writes and reads back)."""
        return self.layout.pages_for(image if isinstance(image, int) else len(image))

    # ---- what
    def set(self, *, erase_fail: Iterable[int] = (), program_fail: Iterable[int] = (),
            bitflip: Iterable[BitFlip] = ()) -> FlashFaults:
        """Replace the cart's faults; they take effect at its next flash operation. Returns the faults
        now in force (the rack's answer)."""
        want = FlashFaults(tuple(erase_fail), tuple(program_fail), tuple(bitflip))
        return self.control.put(self.slot, want, label=self.cart_id)

    def get(self) -> FlashFaults:
        return self.control.get(self.slot, label=self.cart_id)

    def clear(self) -> FlashFaults:
        return self.control.delete(self.slot, label=self.cart_id)

    def describe(self, page: int) -> str:
        """`page` in the lab's words: "page 1170 (page 144 of slot B)"."""
        return f"page {page} ({self.layout.region_of(page)})"

    def __repr__(self) -> str:
        return f"<CartFlashFaults {self.cart_id} slot {self.slot} via {self.control.url}>"
