"""systemd's notify protocol, the few lines it takes: one datagram to $NOTIFY_SOCKET.

Contract: `notify(b"READY=1")` returns True when a notify socket is set and the message was sent,
False otherwise; it never raises, so egress runs the same with or without systemd.
https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html
"""

from __future__ import annotations

import os
import socket


def notify(message: bytes) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # '@' marks an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        return False
    return True
