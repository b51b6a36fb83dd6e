import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ugem.errors import RemoteProtocolError
from ugem.fd import OwnedFd
from ugem.wire.frames import HEADER, MAX_PAYLOAD, FrameKind, FrameParser, Op, encode_header


def _feed_all(parser, data, fds=()):
    """Feed like the daemon does: never more than bytes_desired at a time."""
    fds = list(fds)
    while data:
        n = parser.bytes_desired()
        parser.feed(data[:n], fds)
        fds = []
        data = data[n:]


def test_one_frame_with_payload():
    p = FrameParser(FrameKind.REQUEST)
    _feed_all(p, encode_header(3, Op.GEM_CREATE, 0, FrameKind.REQUEST, 7) + b"abc")
    frame = p.next_frame()
    assert (frame.op, frame.seq, frame.payload) == (Op.GEM_CREATE, 7, b"abc")
    assert p.next_frame() is None and not p.mid_frame


def test_empty_payload_frame():
    p = FrameParser(FrameKind.REQUEST)
    _feed_all(p, encode_header(0, Op.STATS, 0, FrameKind.REQUEST, 1))
    assert p.next_frame().payload == b""


def test_length_checked_before_payload():
    p = FrameParser(FrameKind.REQUEST)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        p.feed(encode_header(MAX_PAYLOAD + 1, Op.STATS, 0, FrameKind.REQUEST, 1), [])


def test_fds_must_match_the_header():
    p = FrameParser(FrameKind.REQUEST)
    r, w = os.pipe()
    fds = [OwnedFd(r), OwnedFd(w)]
    with pytest.raises(RemoteProtocolError, match="announces 1 fds, 2"):
        p.feed(encode_header(0, Op.PRIME_FD_TO_HANDLE, 1, FrameKind.REQUEST, 1), fds)
    assert all(fd.closed for fd in fds)


def test_fds_in_the_middle_of_a_frame_are_refused():
    p = FrameParser(FrameKind.REQUEST)
    p.feed(encode_header(8, Op.GEM_CLOSE, 0, FrameKind.REQUEST, 1), [])
    r, w = os.pipe()
    os.close(w)
    fd = OwnedFd(r)
    with pytest.raises(RemoteProtocolError, match="middle"):
        p.feed(b"1234", [fd])
    assert fd.closed


def test_request_with_status_and_wrong_kind():
    with pytest.raises(RemoteProtocolError):
        FrameParser(FrameKind.REQUEST).feed(encode_header(0, 1, 0, FrameKind.REQUEST, 1, status=5), [])
    with pytest.raises(RemoteProtocolError):
        FrameParser(FrameKind.REQUEST).feed(encode_header(0, 1, 0, FrameKind.REPLY, 1), [])


def test_a_request_parser_takes_posts_and_a_reply_parser_does_not():
    p = FrameParser(FrameKind.REQUEST)
    _feed_all(p, encode_header(0, 1, 0, FrameKind.POST, 1) + encode_header(0, 1, 0, FrameKind.REQUEST, 2))
    assert [(f.kind, f.seq) for f in p.ready] == [(FrameKind.POST, 1), (FrameKind.REQUEST, 2)]
    with pytest.raises(RemoteProtocolError):
        FrameParser(FrameKind.REQUEST).feed(encode_header(0, 1, 0, FrameKind.POST, 1, status=5), [])
    with pytest.raises(RemoteProtocolError):
        FrameParser(FrameKind.REPLY).feed(encode_header(0, 1, 0, FrameKind.POST, 1), [])


def test_chunk_starting_inside_a_frame_must_not_cross_its_end():
    p = FrameParser(FrameKind.REQUEST)
    p.feed(encode_header(4, 1, 0, FrameKind.REQUEST, 1)[:10], [])
    with pytest.raises(RemoteProtocolError, match="crosses"):
        p.feed(encode_header(4, 1, 0, FrameKind.REQUEST, 1)[10:] + b"abcd" + b"x", [])


def _frame(seq, payload=b"", nfds=0, op=Op.GEM_CLOSE):
    return encode_header(len(payload), op, nfds, FrameKind.REQUEST, seq) + payload


def _pipe_fds(n):
    fds = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        fds.append(OwnedFd(r))
    return fds


def test_a_burst_between_frames_gives_every_frame_in_order():
    p = FrameParser(FrameKind.REQUEST)
    burst = b"".join(_frame(i, bytes([i]) * i) for i in range(1, 6)) + _frame(6, b"123456")[:9]
    assert p.bytes_desired(16384) == 16384
    p.feed(burst, [])
    assert [p.next_frame().seq for _ in range(5)] == [1, 2, 3, 4, 5]
    assert p.next_frame() is None and p.mid_frame
    assert p.bytes_desired(16384) == 16 - 9  # inside a frame: never past its end
    p.feed(_frame(6, b"123456")[9:16], [])
    assert p.bytes_desired(16384) == 6
    p.feed(b"123456", [])
    assert p.next_frame().payload == b"123456"


def test_fds_of_a_burst_belong_to_its_last_frame():
    p = FrameParser(FrameKind.REQUEST)
    fds = _pipe_fds(2)
    p.feed(_frame(1) + _frame(2) + _frame(3, nfds=2, op=Op.PRIME_FD_TO_HANDLE), fds)
    frames = [p.next_frame() for _ in range(3)]
    assert [len(f.fds) for f in frames] == [0, 0, 2]
    frames[2].close_fds()


def test_fds_of_a_burst_ending_inside_a_frame_belong_to_that_frame():
    p = FrameParser(FrameKind.REQUEST)
    fds = _pipe_fds(1)
    last = _frame(2, b"x" * 8, nfds=1, op=Op.PRIME_FD_TO_HANDLE)
    p.feed(_frame(1) + last[:20], fds)
    assert len(p.next_frame().fds) == 0
    p.feed(last[20:], [])
    frame = p.next_frame()
    assert frame.fds == fds
    frame.close_fds()


@pytest.mark.parametrize("where", ["first", "partial-header"])
def test_fds_that_do_not_match_the_last_frame_are_refused(where):
    p = FrameParser(FrameKind.REQUEST)
    fds = _pipe_fds(1)
    # "first": the frame announcing fds is not the last one of the read; "partial-header":
    # the read ends inside a header, so that frame gets the fds but announces none
    data = _frame(1, nfds=1) + (_frame(2) if where == "first" else _frame(2)[:4])
    with pytest.raises(RemoteProtocolError, match="announces"):
        p.feed(data, fds)
        p.feed(_frame(2)[4:], [])
    assert all(fd.closed for fd in fds)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_frames_or_a_protocol_error(data):
    p = FrameParser(FrameKind.REQUEST)
    try:
        while data:
            n = p.bytes_desired()
            p.feed(data[:n], [])
            data = data[n:]
            while (frame := p.next_frame()) is not None:
                assert len(frame.payload) <= MAX_PAYLOAD
    except RemoteProtocolError:
        pass


def test_header_size():
    assert HEADER.size == 16
