"""Share a numpy array between two processes by flink name (GEM_FLINK / GEM_OPEN).

The creator makes a 256 x 256 float32 array in a ugem object and publishes its global
name; the peer opens the name, gets a handle of its own, maps the same pages, reads the
array and overwrites row 0; the creator sees the peer's write without any copy.

    python share_by_name.py                    # embedded manager (peer: 2nd client)
    python share_by_name.py --socket PATH      # a daemon (`ugem serve`); peer: a 2nd process

Names are manager-wide and an embedded manager lives inside one process, so in the
embedded run the peer is a second client of that manager in this process; against a
daemon the peer is a separate Python process started with subprocess.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

import ugem
from ugem import Buffer

SHAPE = (256, 256)
NBYTES = SHAPE[0] * SHAPE[1] * 4


def peer(dev: ugem.Device, name: int) -> None:
    """The other side: open the name, look at the array, write row 0."""
    with Buffer.open_name(dev, name) as buf:  # a new handle in this client
        arr = buf.array(np.float32, SHAPE)
        print(f"peer (pid {os.getpid()}): opened name {name} as handle {buf.handle}, "
              f"sum = {arr.sum():.0f}")
        arr[0, :] = -1.0  # through the peer's own mapping of the same pages
        print("peer: set row 0 to -1")
    # closing the handle leaves the creator's object alone (it holds its own handle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="talk to the daemon at PATH instead of an embedded manager")
    parser.add_argument("--peer", type=int, metavar="NAME", help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    if args.peer is not None:
        with ugem.connect(args.socket) as dev:
            peer(dev, args.peer)
        return 0

    manager = None if args.socket else ugem.Manager()
    dev = ugem.connect(args.socket) if args.socket else manager.open()
    try:
        with dev, dev.new(NBYTES) as buf:
            arr = buf.array(np.float32, SHAPE)  # zero-copy view of the object
            arr[:] = np.arange(arr.size, dtype=np.float32).reshape(SHAPE) % 7
            name = buf.flink()
            print(f"creator (pid {os.getpid()}): float32 array {SHAPE} in handle {buf.handle}, "
                  f"sum = {arr.sum():.0f}, flink name {name}")
            if args.socket:
                subprocess.run([sys.executable, __file__, "--socket", args.socket, "--peer", str(name)],
                               check=True)
            else:
                assert manager is not None
                print("embedded manager: the peer is a second client in this process")
                with manager.open() as second:
                    peer(second, name)
            assert (arr[0] == -1.0).all() and arr[1, 0] == 256 % 7
            print(f"creator: row 0 now reads {arr[0, 0]} (the peer's write, no copy); "
                  f"sum = {arr.sum():.0f}")
    finally:
        if manager is not None:
            manager.close()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
