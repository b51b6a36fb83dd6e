import errno

import pytest

from ugem.errors import InvalidArgument
from ugem.wire import structs as s


def test_round_trip():
    msg = s.CreateReq(size=12345)
    pieces, fds = s.encode(msg)
    assert fds == []
    assert s.decode(s.CreateReq, b"".join(pieces), []) == msg


def test_short_payload_is_zero_extended():
    assert s.decode(s.CloseReq, b"\x05", []) == s.CloseReq(handle=5)


def test_long_payload_is_einval():
    with pytest.raises(InvalidArgument):
        s.decode(s.CloseReq, bytes(9), [])


def test_nonzero_pad_is_einval():
    with pytest.raises(InvalidArgument) as exc:
        s.CloseReq(handle=1, pad=1).check()
    assert exc.value.errno == errno.EINVAL


def test_unknown_flags_are_einval():
    s.ExportReq(handle=1, flags=s.WRITABLE).check()
    with pytest.raises(InvalidArgument):
        s.ExportReq(handle=1, flags=0x80).check()


def test_tail_carries_data():
    msg = s.PwriteReq(handle=1, offset=2, length=3, data=b"abc")
    pieces, _ = s.encode(msg)
    back = s.decode(s.PwriteReq, b"".join(bytes(p) for p in pieces), [])
    assert (back.handle, back.offset, back.length, bytes(back.data)) == (1, 2, 3, b"abc")


def test_layout_fields_come_first_in_every_struct():
    """decode() builds plain structs positionally: dataclass order must match LAYOUT."""
    import dataclasses

    for cls in s.Struct.__subclasses__():
        names = [f.name for f in dataclasses.fields(cls)]
        assert names[: len(cls.LAYOUT)] == [n for n, _ in cls.LAYOUT], cls.__name__


def test_framed_is_the_header_then_the_fixed_part():
    """Transports pack (and unpack) a fixed struct's whole frame in one call: the same bytes."""
    from ugem.wire.frames import HEADER

    for cls in s.Struct.__subclasses__():
        msg = cls()
        values = cls._codec.unpack(cls._codec.pack(*cls._values(msg)))
        header = (cls._codec.size, 3, 0, 1, 7, 0)
        framed = cls._framed.pack(*header, *values)
        assert framed == HEADER.pack(*header) + cls._codec.pack(*values), cls.__name__
        assert cls._framed.unpack(framed) == (*header, *values)


def test_a_tail_after_the_layout_decodes_positionally_to_the_same_struct():
    """Structs whose fields are LAYOUT's then TAIL, without fds, skip the keyword decode
    (`_tail_last`); every such struct comes back field for field, a short fixed part
    zero-extended as before. A struct with fds never takes that path."""
    import dataclasses

    from ugem.wire import structs_exec as sx
    from ugem.wire import structs_share as ss

    structs = [c for m in (s, sx, ss) for c in vars(m).values()
               if isinstance(c, type) and issubclass(c, s.Struct) and c.TAIL is not None]
    tail_last = [c for c in structs if c._tail_last]
    assert {s.PwriteReq, sx.ExecbufferReq, s.CloseBatchReq} <= set(tail_last)
    assert s.PreadReply in structs and not s.PreadReply._tail_last  # (fds)
    for cls in tail_last:
        names = [f.name for f in dataclasses.fields(cls)]
        assert names == [*cls._names, cls.TAIL], cls.__name__
        values = tuple(range(1, len(cls._names) + 1))
        payload = cls._codec.pack(*values) + b"tail bytes"
        back = s.decode(cls, payload, [])
        assert back == cls(**dict(zip(cls._names, values, strict=True)), **{cls.TAIL: b"tail bytes"}), cls.__name__
        if cls._codec.size:
            short = s.decode(cls, payload[:1], [])
            assert getattr(short, cls.TAIL) == b"" and cls._values(short)[0] == 1, cls.__name__
