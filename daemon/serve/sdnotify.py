"""systemd's notify protocol in the standard library: one datagram to $NOTIFY_SOCKET per message."""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    """Send e.g. 'READY=1' or 'STATUS=...'; False when not run by systemd (no $NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode("utf-8"))
    return True


class Watchdog:
    """Pings WATCHDOG=1 at most every half interval; a no-op unless systemd set WatchdogSec for us."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        enabled = bool(usec) and (not pid or pid == str(os.getpid()))
        self.interval = int(usec) / 1e6 / 2 if enabled else None
        self._last = 0.0

    def ping(self) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            notify("WATCHDOG=1")
