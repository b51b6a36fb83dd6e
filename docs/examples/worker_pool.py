"""Hand numpy arrays to worker processes by reference: a Pool, a ProcessPoolExecutor and a
producer/consumer Queue, with no bytes copied and no fd per array.

The parent makes a (8, 256 Ki) float32 matrix (8 MiB) with `ugem.zeros`. A
`multiprocessing.Pool` scales each row in place in a worker and returns its sum; a
`concurrent.futures.ProcessPoolExecutor` returns a new ugem array it made from a row; a
producer process puts ugem arrays on a `multiprocessing.Queue` and the parent consumes them.
Everything travels by reference: the parent sees the workers' writes in its own arrays.

    python worker_pool.py                  # an embedded manager in each process
    python worker_pool.py --socket PATH    # every process a client of the daemon at PATH

With a daemon, the workers' default device is a client of it (the example sets
$UGEM_SOCKET for them), the objects live in the daemon, and any array can travel onward.
Embedded, each process has its own manager: arrays travel as fds, and what a worker received
can only go back to a process that maps it (the Pool's return here).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
from typing import Any

import numpy as np

import ugem

ROWS, COLS = 8, 256 * 1024


def scale_row(row: np.ndarray) -> float:
    """In a Pool worker: `row` is the parent's memory; double it there."""
    row *= 2
    return float(row.sum())


def running_total(row: np.ndarray) -> np.ndarray:
    """In an executor worker: a new ugem array (the worker's own object), sent back by reference."""
    out = ugem.empty(row.shape, row.dtype)
    np.cumsum(row, out=out)
    return out


def produce(queue: multiprocessing.Queue, count: int, received: Any) -> None:
    """A producer process: make arrays and put them on the queue, then a None to say done.
    As with any fd sent through multiprocessing, the sender stays alive until the receiver
    has them (`received`): its references die with it."""
    for i in range(count):
        a = ugem.empty(1024, np.int64)
        a[:] = i
        queue.put(a)  # by reference: the consumer maps the same memory; dropping `a` here is fine
    queue.put(None)
    received.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="a ugem daemon's socket (default: an embedded manager per process)")
    args = parser.parse_args()
    if args.socket:
        os.environ["UGEM_SOCKET"] = args.socket  # this process's default device, and the workers'
    else:
        os.environ["UGEM_SOCKET"] = os.path.join(os.getcwd(), "no-daemon.sock")  # nobody listens: embedded
    ctx = multiprocessing.get_context("spawn")  # the strictest start method: nothing inherited
    dev = ugem.default_device()
    print(f"parent (pid {os.getpid()}): {'daemon client' if args.socket else 'embedded manager'}")

    data = ugem.zeros((ROWS, COLS), np.float32)
    data[:] = 1
    with ctx.Pool(2) as pool:
        sums = pool.map(scale_row, [data[i] for i in range(ROWS)])
    print(f"pool: row sums {sums[0]:.0f} x {len(sums)}; parent sees {data[:, 0].tolist()[:3]}...")
    assert sums == [2.0 * COLS] * ROWS and (data == 2).all()

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        total = ex.submit(running_total, data[3]).result()
    print(f"executor: running total ends at {total[-1]:.0f} (an array made by the worker)")
    assert total[-1] == 2 * COLS

    queue: multiprocessing.Queue = ctx.Queue()
    received = ctx.Event()
    producer = ctx.Process(target=produce, args=(queue, 5, received))
    producer.start()
    got = []
    while (a := queue.get()) is not None:
        got.append(int(a[0]))
    received.set()
    producer.join()
    print(f"queue: consumed arrays {got} from the producer (pid {producer.pid})")
    assert got == [0, 1, 2, 3, 4] and producer.exitcode == 0

    del data, total, a
    print(f"objects left: {dev.stats()['objects']}")  # the arrays were all that held them
    print("ok")


if __name__ == "__main__":
    main()
