"""A serial cable for one slot: a long-lived pty behind a stable symlink.

The harness opens the slave through the symlink (like /dev/serial/by-id/...). The cart
process gets the master as an inherited fd. The cable keeps both ends open for its whole
life, so the harness's port survives the cart losing power, as a USB-UART adapter does.
"""

from __future__ import annotations

import os
import tty
from pathlib import Path


class Cable:
    def __init__(self, link: Path):
        self.link = Path(link)
        self.master_fd = -1
        self.slave_fd = -1

    def open(self) -> None:
        self.master_fd, self.slave_fd = os.openpty()
        # raw on both ends: no echo, no CR/LF translation (pyserial sets raw again on open)
        tty.setraw(self.master_fd)
        tty.setraw(self.slave_fd)
        os.set_inheritable(self.master_fd, True)
        self.link.parent.mkdir(parents=True, exist_ok=True)
        if self.link.is_symlink() or self.link.exists():
            self.link.unlink()
        os.symlink(os.ttyname(self.slave_fd), self.link)

    @property
    def tty(self) -> str:
        return os.ttyname(self.slave_fd)

    def close(self) -> None:
        if self.link.is_symlink():
            try:
                if os.readlink(self.link) == self.tty:
                    self.link.unlink()
            except OSError:
                pass
        for fd in (self.master_fd, self.slave_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master_fd = self.slave_fd = -1
