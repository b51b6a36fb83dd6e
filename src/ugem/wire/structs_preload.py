"""Request structs of manager-owned (preloaded) objects: LOOKUP (SPEC §2 `lookup`).

The reply is `structs.FlinkReply` (the object's flink name). Rules as in structs.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .structs import Struct

__all__ = ["LookupReq"]


@dataclass(slots=True)
class LookupReq(Struct):
    """The label given to `--object LABEL=PATH`, UTF-8, as the whole payload."""

    LAYOUT = ()
    TAIL = "label"
    label: bytes = b""
