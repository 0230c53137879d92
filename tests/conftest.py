"""Shared helpers for the harness's and vrack's own tests."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml

from vrack.broker import Broker, free_port

ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """n distinct free ports, outside the ephemeral range (see vrack.broker.free_port)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def write_rig(tmp_path: Path, carts: list[str], **overrides) -> Path:
    """A virtual rig of a few slots on free loopback ports, its run dir under tmp_path.

    Slots alternate between an R&S NGP804 and a Rigol DP832 supply (channels rated for every cart)."""
    ports = free_ports(3)
    run = tmp_path / "run"
    rig = {
        "name": "test-rig", "kind": "virtual", "configs": str(ROOT / "configs"), "power_off_s": 0.05,
        "virtual": {"run_dir": str(run), "flash_time_scale": 0.05},
        "broker": {"host": "127.0.0.1", "port": ports[2], "ca": str(run / "broker/ca.pem"),
                   "cert": str(run / "broker/harness.pem"), "key": str(run / "broker/harness.key")},
        "supplies": [
            {"name": "psu-k", "resource": f"TCPIP0::127.0.0.1::{ports[0]}::SOCKET", "dialect": "rs-ngx",
             "model": "NGP804", "channels": 4, "timeout_ms": 500},  # 32 V channels: every cart's voltage
            {"name": "psu-r", "resource": f"TCPIP0::127.0.0.1::{ports[1]}::SOCKET", "dialect": "rigol-dp800",
             "model": "DP832", "channels": 3, "timeout_ms": 500},
        ],
        "recovery": {"method": "serial", "image": str(run / "factory/fw-{version}.img"),
                     "trust_store": str(run / "factory/trust-{cart}.bin")},
        "slots": [
            {"slot": i + 1, "cart": c, "console": str(run / f"dev/serial/by-id/vcart-slot{i + 1:02d}"),
             "supply": "psu-k" if i % 2 == 0 else "psu-r", "channel": i // 2 + 1}
            for i, c in enumerate(carts)
        ],
    }
    rig.update(overrides)
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(rig, sort_keys=False))
    return path


@contextlib.contextmanager
def running_broker(tmp_path_factory, name: str, clients: list[str]):
    """mosquitto with TLS client certificates for `clients` (plus "harness"), stopped afterwards."""
    b = Broker(tmp_path_factory.mktemp(name) / "rack", free_port(), ["harness", *clients])
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def broker_factory():
    """`with broker_factory(tmp_path_factory, name, clients) as broker:` in any test scope."""
    return running_broker


@pytest.fixture
def rig_factory(tmp_path):
    def make(carts, **overrides):
        return write_rig(tmp_path, carts, **overrides)

    return make


pytest_plugins = ["pytester"]
