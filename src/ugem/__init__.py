"""ugem: the Linux GEM/TTM buffer-object manager in user space.

This module only re-exports; `__all__` is checked by tests/unit/test_exports.py.
`__version__` is the one place the version is written (pyproject.toml reads it).
"""

__version__ = "0.1.0"

from . import cmd
from .client import pickling as _pickling  # noqa: F401  (registers multiprocessing reducers)
from .client.arrays import array, empty, zeros
from .client.buffer import Buffer
from .client.connect import connect
from .client.default import default_device
from .client.device import Device, ObjectInfo
from .config import Config
from .constants import (
    CACHING_CACHED,
    CACHING_DISPLAY,
    CACHING_NONE,
    DOMAIN_CPU,
    DOMAIN_DEVICE,
    DONTNEED,
    PAGE_SIZE,
    TILING_NONE,
    TILING_X,
    TILING_Y,
    WILLNEED,
)
from .errors import (
    BadAddress,
    BadFd,
    Busy,
    DaemonGone,
    InvalidArgument,
    NoDevice,
    NoSpace,
    NoSuchDeviceOrAddress,
    NoSuchObject,
    OutOfMemory,
    PermissionDenied,
    QuotaExceeded,
    TimedOut,
    TimerExpired,
    TooBig,
    TryAgain,
    UgemError,
)
from .manager import Manager, embedded

__all__ = [
    "CACHING_CACHED",
    "CACHING_DISPLAY",
    "CACHING_NONE",
    "DOMAIN_CPU",
    "DOMAIN_DEVICE",
    "DONTNEED",
    "PAGE_SIZE",
    "TILING_NONE",
    "TILING_X",
    "TILING_Y",
    "WILLNEED",
    "BadAddress",
    "BadFd",
    "Buffer",
    "Busy",
    "Config",
    "DaemonGone",
    "Device",
    "InvalidArgument",
    "Manager",
    "NoDevice",
    "NoSpace",
    "NoSuchDeviceOrAddress",
    "NoSuchObject",
    "ObjectInfo",
    "OutOfMemory",
    "PermissionDenied",
    "QuotaExceeded",
    "TimedOut",
    "TimerExpired",
    "TooBig",
    "TryAgain",
    "UgemError",
    "array",
    "cmd",
    "connect",
    "default_device",
    "embedded",
    "empty",
    "zeros",
]
