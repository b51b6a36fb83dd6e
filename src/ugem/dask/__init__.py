"""ugem as the node's memory for Dask workers (the `dask` extra: `pip install 'ugem[dask]'`).

`UgemBuffer` (buffer.py; its writer thread: writer.py; one value in its object: stored.py)
is a worker data mapping for
`distributed`'s `data=` parameter; `UgemArray` (handoff.py) is the array type it returns,
which workers on one machine pass to each other by reference, and `PendingArray`
(pending.py) the read-only view it returns of an array still being copied into its object;
`python -m ugem.dask.worker` (worker.py) starts ugem-backed workers for a scheduler, where
the `dask worker` command has no `data=` option.
"""

from .buffer import UgemBuffer
from .handoff import UgemArray
from .pending import PendingArray

__all__ = ["PendingArray", "UgemArray", "UgemBuffer"]
