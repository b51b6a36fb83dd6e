"""Pure allocation and eviction machinery: the range allocator, its eviction scan, LRUs.

Layer rule (checked by tests/unit/test_layering.py): nothing here imports socket,
selectors, signal, threading or mmap, touches an fd, or knows what a buffer object is.
These are data structures; the policy that drives them (which objects may be evicted, in
which passes) lives above them. This module only re-exports.
"""

from .lru import Lru
from .range import InsertMode, Node, RangeAllocator
from .scan import EvictionScan

__all__ = ["EvictionScan", "InsertMode", "Lru", "Node", "RangeAllocator"]
