"""`python -m ugem.dask.worker SCHEDULER`: ugem-backed Dask workers, where `dask worker` would be used.

The `dask worker` command has no option for a worker's data mapping (and a `--preload`
module runs only after the worker made its own), so this launcher starts `--nworkers`
`distributed.Nanny` processes with `data=(UgemBuffer, {...})` and waits until they end.
Start the node's daemon (`ugem serve`) first; `--socket` names it (default: as
`ugem.connect()` finds it). SIGTERM or SIGINT closes the workers (their objects are released
with them); each Nanny restarts a worker that dies, as `dask worker` does.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from distributed import Nanny

from .buffer import UgemBuffer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ugem.dask.worker", description=__doc__.splitlines()[0])
    p.add_argument("scheduler", help="the scheduler's address, e.g. tcp://10.0.0.1:8786")
    p.add_argument("--nworkers", type=int, default=1, help="worker processes to start (default 1)")
    p.add_argument("--nthreads", type=int, default=1, help="threads per worker (default 1)")
    p.add_argument("--memory-limit", default="auto", help="each worker's Dask memory limit (default auto)")
    p.add_argument("--socket", default=None, help="the ugem daemon's socket (default: as ugem.connect() finds it)")
    p.add_argument("--target", default=None, help="bytes each worker keeps mapped (default: a sixteenth of the "
                   "daemon's budget, at most 64M)")
    p.add_argument("--min-size", default="64K", help="smaller values stay in the worker's heap")
    p.add_argument("--defer", default=None, help="bytes of new arrays each worker keeps in its heap before copying "
                   "them into objects (default: a sixteenth of the daemon's budget)")
    p.add_argument("--name", default=None, help="worker name prefix (default: Dask's)")
    return p


async def _run(args: argparse.Namespace) -> None:
    data: dict[str, Any] = {"socket": args.socket, "target": args.target, "min_size": args.min_size,
                            "defer": args.defer}
    nannies = [Nanny(args.scheduler, nthreads=args.nthreads, memory_limit=args.memory_limit,
                     data=(UgemBuffer, data), name=None if args.name is None else f"{args.name}-{i}")
               for i in range(args.nworkers)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await asyncio.gather(*nannies)
    ended: list[Any] = [n.finished for n in nannies]  # untyped in distributed
    waits = [asyncio.ensure_future(stop.wait()), *(asyncio.ensure_future(f()) for f in ended)]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*(n.close() for n in nannies))
    for w in waits:
        w.cancel()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_run(_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
