"""Public constants of the client API (SPEC §2, §3): advice, domains, tiling, caching, limits.

Values equal the kernel's where the kernel has one (i915_drm.h): WILLNEED 0, DONTNEED 1,
TILING_NONE/X/Y 0/1/2, CACHING_NONE/CACHED/DISPLAY 0/1/2, DOMAIN_CPU 0x1.
"""

from __future__ import annotations

__all__ = [
    "CACHING_CACHED",
    "CACHING_DISPLAY",
    "CACHING_NONE",
    "DOMAIN_CPU",
    "DOMAIN_DEVICE",
    "DONTNEED",
    "MAX_OBJECT_SIZE",
    "PAGE_SIZE",
    "TILING_NONE",
    "TILING_X",
    "TILING_Y",
    "WILLNEED",
    "page_align",
]

PAGE_SIZE = 4096
MAX_OBJECT_SIZE = 1 << 46

WILLNEED = 0
DONTNEED = 1
ADVICE_PURGED = 2  # the advice info() and `ugem ls` report once the contents are gone

# How info() and `ugem ls` name an object's advice and placement: the wire carries the index
# into these (advice: WILLNEED, DONTNEED or ADVICE_PURGED; placement: core/states.py's
# Placement value, whose `label` is taken from here).
ADVICE_LABELS = ("willneed", "dontneed", "purged")
PLACEMENT_LABELS = ("none", "system", "vram", "spilled", "purged", "freed")

DOMAIN_CPU = 0x1
DOMAIN_DEVICE = 0x2

TILING_NONE = 0
TILING_X = 1
TILING_Y = 2

CACHING_NONE = 0
CACHING_CACHED = 1
CACHING_DISPLAY = 2


def page_align(size: int) -> int:
    """Round `size` up to a whole number of pages."""
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
