"""A serial cable for one slot: a long-lived pty behind a stable symlink.

The harness opens the slave through the symlink (like /dev/serial/by-id/...). The cart
process gets the master as an inherited fd. The cable keeps both ends open for its whole
life, so the harness's port survives the cart losing power, as a USB-UART adapter does.

The cable never destroys what the rack did not create: it makes its link only where nothing
is, or in place of a rack console link (a symlink to a pty under /dev/pts, also a stale one
left by a rack that was killed). A regular file, a directory, a symlink to anything else:
refused (CableError). On close it removes the link only if it is still its own.
"""

from __future__ import annotations

import os
import re
import stat
import tty
from pathlib import Path

_PTY_RE = re.compile(r"/dev/pts/[0-9]+")


class CableError(Exception):
    """The console path is taken by something the rack did not create, or cannot be made."""


def _describe(path: Path) -> str:
    """What is at `path`, for an error message."""
    try:
        st = os.lstat(path)
    except OSError:
        return "nothing"
    if stat.S_ISLNK(st.st_mode):
        try:
            return f"a symlink to {os.readlink(path)!r}"
        except OSError:
            return "a symlink"
    if stat.S_ISREG(st.st_mode):
        return "a regular file"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    return "a special file"


def is_rack_link(path: Path | str) -> bool:
    """Is `path` a console link as a cable makes it: a symlink whose target is /dev/pts/<n>,
    that pty either gone (the rack that made it was killed) or a character device."""
    try:
        target = os.readlink(path)
    except OSError:
        return False
    if not _PTY_RE.fullmatch(target):
        return False
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode)


class Cable:
    def __init__(self, link: Path):
        self.link = Path(link)
        self.master_fd = -1
        self.slave_fd = -1
        self._tty = ""

    def check(self) -> None:
        """CableError (one line, naming the path) if the link's path is taken by something not the rack's."""
        if os.path.lexists(self.link) and not is_rack_link(self.link):
            raise CableError(f"{self.link} is {_describe(self.link)}, not a console link of the rack: "
                             "refusing to replace it")

    def open(self) -> None:
        """Make the pty and its link. CableError (one line, naming the path) if the path is taken."""
        self.check()
        try:
            self.link.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CableError(f"{self.link}: cannot make its directory: {exc.strerror or exc}") from None
        self.master_fd, self.slave_fd = os.openpty()
        try:
            # raw on both ends: no echo, no CR/LF translation (pyserial sets raw again on open)
            tty.setraw(self.master_fd)
            tty.setraw(self.slave_fd)
            os.set_inheritable(self.master_fd, True)
            self._tty = os.ttyname(self.slave_fd)
            if is_rack_link(self.link):
                self.link.unlink()  # our own link from an earlier rack (stale: its pty is gone or unused)
            try:
                os.symlink(self._tty, self.link)  # never replaces: whatever appeared meanwhile stays
            except OSError as exc:
                raise CableError(f"{self.link}: cannot make the console link: {exc.strerror or exc}") from None
        except BaseException:
            self._close_fds()
            raise

    @property
    def tty(self) -> str:
        return self._tty or os.ttyname(self.slave_fd)

    def close(self) -> None:
        """Remove the link if it is still ours (points at this cable's pty), then close the pty."""
        if self._tty and self.link.is_symlink():
            try:
                if os.readlink(self.link) == self._tty:
                    self.link.unlink()
            except OSError:
                pass
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self.master_fd, self.slave_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master_fd = self.slave_fd = -1
