"""`PendingArray`: what a `UgemBuffer` returns for an array its writer thread is still storing.

Rules:
- a task that reads a value the writer thread (writer.py) has not copied into its object
  yet gets a read-only `PendingArray` view of the value itself, at once: tasks never wait
  for that copy. Read-only, because the copy is being made from the same memory: a task
  writing into its input (which Dask asks tasks not to do) gets numpy's "read-only" error
  instead of a half-copied object. Arithmetic on it gives plain arrays, and plain pickle
  and cloudpickle send it by value as a plain `ndarray`, as for `UgemArray` (handoff.py);
- sent to a worker on the same host (Dask's "dask" serializer family), a `PendingArray`
  that is the whole value Dask read travels as a reference to its object, exactly as the
  value's `UgemArray` would (handoff.py), once the copy is made: by the sending thread
  itself (Dask serializes a large message on a thread of its own, a small one on the
  event loop) unless the writer thread has started it, so a transfer never waits behind
  the writer's queue. Anything else (a
  slice or view of it, which carries no owner; a value deleted meanwhile, or kept in the
  heap because the daemon had no room; another host) declines, and Dask sends the bytes;
  so does a value whose copy or reference fails (any OSError, handoff.py `or_bytes`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import numpy.typing as npt
from distributed.protocol.serialize import dask_deserialize, dask_serialize

from .handoff import PlainResults, UgemArray, dumps_reference, loads_reference, or_bytes, same_host

__all__ = ["PendingArray", "pending_view"]

#: `owner.stored_view(key, token)`: the stored value's `UgemArray` once the copy is done,
#: or None (deleted, replaced, kept in the heap)
StoredView = Callable[[Any, Hashable, object], UgemArray | None]


class PendingArray(PlainResults):
    """A read-only view of a value still being copied into its object (module rules)."""

    _ugem_source: tuple[weakref.ref[Any], Hashable, object, StoredView] | None = None


def pending_view(owner: Any, key: Hashable, value: npt.NDArray[Any], token: object,
                 stored_view: StoredView) -> PendingArray:
    """A read-only `PendingArray` of `value`, the pending value of `owner[key]`; `token`
    identifies that pending value (a later value of the same key has another)."""
    view = value.view(PendingArray)
    view.flags.writeable = False
    view._ugem_source = (weakref.ref(owner), key, token, stored_view)
    return view


@or_bytes
def _dumps(x: PendingArray, context: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    source = x.__dict__.get("_ugem_source")  # set on the view pending_view made, not on views of it
    owner = None if source is None or not same_host(context) else source[0]()
    stored = None if owner is None or source is None else source[3](owner, source[1], source[2])
    if stored is None:
        raise NotImplementedError("not a stored value of a ugem-backed worker on this host: send the bytes")
    return dumps_reference(stored, context)


_register: Any = dask_serialize.register  # untyped in distributed
_register(PendingArray)(_dumps)
_register = dask_deserialize.register
_register(PendingArray)(loads_reference)
