"""The device half of the client API (SPEC §2): execbuffer, busy/wait, domains, tiling,
caching, suspend/resume, `lookup` of the manager's preloaded objects, and `sole` (whether
a handle is all that refers to its object). A mixin of `Device`; same transport, same errno."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..cmd import Command
from ..errors import InvalidArgument, TooBig
from ..wire import structs as s
from ..wire import structs_domain as sd
from ..wire import structs_exec as sx
from ..wire.commands import encode_commands
from ..wire.frames import Op
from ..wire.structs_preload import LookupReq
from .args import i64, ident, u32, u64

__all__ = ["DeviceOps"]

_BUSY = Op.GEM_BUSY  # (looked up once: each `Op.X` costs 0.1 us on Python 3.11)


class DeviceOps:
    def _call(self, op: Op, req: s.Struct) -> Any:
        raise NotImplementedError

    def sole(self, handle: int) -> bool:
        """Whether `handle` is all that refers to its object: no other handle (in any
        client, this one's included), no mapping (this client's included: a mapping whose
        last view is gone counts until it is reported, which this request does first), no
        transfer, share or device work in flight, never exported. Then nobody else sees the
        object's bytes (e.g. before reusing it for new contents). A name holds no reference.
        False from a daemon too old to tell. Unknown handle: ENOENT."""
        req = s.InfoReq(handle=ident(handle), flags=s.INFO_ASK_SOLE)
        try:
            reply: s.InfoReply = self._call(Op.GEM_INFO, req)
        except InvalidArgument:  # an older daemon refuses the flag
            return False
        return bool(reply.flags & s.INFO_SOLE)

    def execbuffer(self, commands: Sequence[Command]) -> int:
        """Submit device commands (ugem.cmd); returns their fence. More than MAX_COMMANDS
        (11,962) commands do not fit in one request: E2BIG before anything is sent, in
        both modes (split the work into several submissions)."""
        try:
            listed = list(commands)
        except TypeError:
            raise InvalidArgument(f"execbuffer takes a list of device commands, got {commands!r}") from None
        if len(listed) > sx.MAX_COMMANDS:
            raise TooBig(f"execbuffer of {len(listed)} commands does not fit in one request (at most "
                         f"{sx.MAX_COMMANDS}); submit them in several execbuffers")
        r: sx.FenceReply = self._call(Op.GEM_EXECBUFFER, sx.ExecbufferReq(data=encode_commands(listed)))
        return int(r.fence)

    def busy(self, handle: int) -> bool:
        r: sx.BusyReply = self._call(_BUSY, s.HandleReq(ident(handle)))  # (positional: handle)
        return bool(r.busy)

    def wait(self, handle: int, timeout_ns: int) -> int:
        """Wait for the device work using the object; returns the time left (kernel rules)."""
        r: sx.WaitReply = self._call(Op.GEM_WAIT, sx.WaitReq(handle=ident(handle),
                                                             timeout_ns=i64(timeout_ns, "timeout_ns")))
        return int(r.remaining_ns)

    def wait_fence(self, fence: int, timeout_ns: int) -> int:
        r: sx.WaitReply = self._call(Op.WAIT_FENCE, sx.WaitFenceReq(fence=u64(fence, "fence"),
                                                                    timeout_ns=i64(timeout_ns, "timeout_ns")))
        return int(r.remaining_ns)

    def set_domain(self, handle: int, read_domains: int, write_domain: int = 0) -> None:
        req = sd.SetDomainReq(handle=ident(handle), read_domains=u32(read_domains, "read_domains"),
                              write_domain=u32(write_domain, "write_domain"))
        self._call(Op.GEM_SET_DOMAIN, req)

    def set_tiling(self, handle: int, mode: int, stride: int) -> tuple[int, int]:
        r: sd.TilingReply = self._call(Op.GEM_SET_TILING, sd.TilingReq(handle=ident(handle), mode=u32(mode, "mode"),
                                                                      stride=u32(stride, "stride")))
        return int(r.mode), int(r.stride)

    def get_tiling(self, handle: int) -> tuple[int, int]:
        r: sd.TilingReply = self._call(Op.GEM_GET_TILING, s.HandleReq(handle=ident(handle)))
        return int(r.mode), int(r.stride)

    def set_caching(self, handle: int, level: int) -> None:
        self._call(Op.GEM_SET_CACHING, sd.CachingReq(handle=ident(handle), level=u32(level, "level")))

    def get_caching(self, handle: int) -> int:
        r: sd.CachingReply = self._call(Op.GEM_GET_CACHING, s.HandleReq(handle=ident(handle)))
        return int(r.level)

    def suspend(self) -> None:
        """Save device memory and hold device work (privileged)."""
        self._call(Op.SUSPEND, s.Empty())

    def resume(self) -> None:
        self._call(Op.RESUME, s.Empty())

    def lookup(self, label: str) -> int:
        """The flink name of the object the manager preloaded under `label` (`ugem serve
        --object LABEL=PATH`, or `Manager(object=[...])`); open it with `open_name`, from
        any uid, read-only. While its file is still loading the call waits. An unknown
        label is ENOENT (EIO if its file could not be loaded)."""
        if not isinstance(label, str):
            raise InvalidArgument(f"label must be a str, got {type(label).__name__}")
        r: s.FlinkReply = self._call(Op.LOOKUP, LookupReq(label=label.encode(errors="surrogateescape")))
        return int(r.name)
