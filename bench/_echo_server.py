"""The bare baseline for bench_roundtrip: a minimal Python request/response server.

`python bench/_echo_server.py SOCKET_PATH` listens on a Unix stream socket, prints "ready"
and serves until SIGTERM. It is what the daemon's control path is compared with: one
thread, a `selectors` loop (epoll, as the daemon's), non-blocking sockets; every request is a 16-byte header
(the same layout as ugem's frame header: length, op, nfds, kind, seq, status) followed by
`length` payload bytes; every reply is a 16-byte header and an 8-byte payload. No dispatch,
no decoding beyond the header: the floor of a Python round trip.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import sys

HEADER = struct.Struct("<IHBBIi")
REPLY_PAYLOAD = b"\x00" * 8


def on_readable(conn: socket.socket, buf: bytearray) -> bool:
    """Serve what arrived on `conn`; False when the peer closed."""
    try:
        data = conn.recv(65536)
    except BlockingIOError:
        return True
    if not data:
        return False
    buf += data
    while len(buf) >= HEADER.size:
        length, op, _nfds, _kind, seq, _status = HEADER.unpack_from(buf)
        if len(buf) < HEADER.size + length:
            break
        del buf[: HEADER.size + length]
        conn.sendall(HEADER.pack(len(REPLY_PAYLOAD), op, 0, 1, seq, 0) + REPLY_PAYLOAD)
    return True


def serve(path: str) -> None:
    sel = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(16)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    buffers: dict[int, bytearray] = {}
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    try:
        while not stop:
            events = sel.select(timeout=0.5)
            for key, _ in events:
                if key.data is None:
                    conn, _ = listener.accept()
                    conn.setblocking(False)
                    buffers[conn.fileno()] = bytearray()
                    sel.register(conn, selectors.EVENT_READ, conn)
                    continue
                conn = key.data
                if not on_readable(conn, buffers[conn.fileno()]):
                    sel.unregister(conn)
                    buffers.pop(conn.fileno(), None)
                    conn.close()
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    serve(sys.argv[1])
