"""Share a numpy array with another process by exported fd (PRIME), over a Unix socket.

The parent makes a (64, 1024) int64 array in a ugem object, exports an fd to it
(`Buffer.export()`), and sends the fd to a child process with `socket.send_fds` (SCM_RIGHTS)
together with the dtype and shape. The child needs no manager to use it: it maps the fd
with `mmap` and views it with numpy. When it can reach the daemon it may instead import the
fd (`Buffer.import_fd`), which gives it a handle of its own. Either way it doubles every
element in place and the parent sees the result in its own view, without a copy.

    python share_by_fd.py                  # embedded manager; the child mmaps the fd
    python share_by_fd.py --socket PATH    # a daemon; the child imports the fd as a handle

Unlike names, fds work across users: whoever holds the fd can map the object.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import subprocess
import sys

import numpy as np

import ugem
from ugem import Buffer

SHAPE = (64, 1024)
DTYPE = "int64"


def child(sock_fd: int, socket_path: str | None) -> None:
    """The receiving process: take the fd from the socket, use it, report back."""
    with socket.socket(fileno=sock_fd) as sock:
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        meta = json.loads(msg)
        fd = fds[0]
        size = os.lseek(fd, 0, os.SEEK_END)  # an exported fd's size is the object's size
        count = int(np.prod(meta["shape"]))
        if socket_path:
            with ugem.connect(socket_path) as dev, Buffer.import_fd(dev, fd) as buf:
                os.close(fd)  # the handle holds the object now
                print(f"child (pid {os.getpid()}): imported the fd as handle {buf.handle} ({buf.size} bytes)")
                arr = buf.array(meta["dtype"], meta["shape"])
                print(f"child: sum = {arr.sum()}")
                arr *= 2
        else:
            region = mmap.mmap(fd, size)  # plain mmap of the fd: no manager involved
            os.close(fd)
            print(f"child (pid {os.getpid()}): mapped the fd directly ({size} bytes)")
            arr = np.frombuffer(region, meta["dtype"], count).reshape(meta["shape"])
            print(f"child: sum = {arr.sum()}")
            arr *= 2
            del arr
            region.close()
        print("child: doubled every element")
        sock.sendall(b"done")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="talk to the daemon at PATH instead of an embedded manager")
    parser.add_argument("--child", type=int, metavar="FD", help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.child is not None:
        child(args.child, args.socket)
        return 0

    dev = ugem.connect(args.socket) if args.socket else ugem.embedded()
    with dev, dev.new(int(np.prod(SHAPE)) * np.dtype(DTYPE).itemsize) as buf:
        arr = buf.array(DTYPE, SHAPE)
        arr[:] = np.arange(arr.size).reshape(SHAPE)
        print(f"parent (pid {os.getpid()}): {DTYPE} array {SHAPE} in handle {buf.handle}, sum = {arr.sum()}")

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            cmd = [sys.executable, __file__, "--child", str(theirs.fileno())]
            if args.socket:
                cmd += ["--socket", args.socket]
            proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
            theirs.close()
            fd = buf.export()  # ours to close once sent
            try:
                socket.send_fds(ours, [json.dumps({"dtype": DTYPE, "shape": SHAPE}).encode()], [fd])
                print(f"parent: sent fd {fd} over a Unix socket")
            finally:
                os.close(fd)
            reply = ours.recv(16)
            if proc.wait() != 0 or reply != b"done":
                print(f"child failed (status {proc.returncode})")
                return 1
        expected = np.arange(arr.size).reshape(SHAPE) * 2
        assert np.array_equal(arr, expected)
        print(f"parent: sum is now {arr.sum()} (the child's writes, no copy)")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
