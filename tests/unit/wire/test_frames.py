import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ugem.errors import RemoteProtocolError
from ugem.fd import OwnedFd
from ugem.wire.frames import HEADER, MAX_PAYLOAD, FrameParser, Kind, Op, encode_header


def _feed_all(parser, data, fds=()):
    """Feed like the daemon does: never more than bytes_desired at a time."""
    fds = list(fds)
    while data:
        n = parser.bytes_desired()
        parser.feed(data[:n], fds)
        fds = []
        data = data[n:]


def test_one_frame_with_payload():
    p = FrameParser(Kind.REQUEST)
    _feed_all(p, encode_header(3, Op.GEM_CREATE, 0, Kind.REQUEST, 7) + b"abc")
    frame = p.next_frame()
    assert (frame.op, frame.seq, frame.payload) == (Op.GEM_CREATE, 7, b"abc")
    assert p.next_frame() is None and not p.mid_frame


def test_empty_payload_frame():
    p = FrameParser(Kind.REQUEST)
    _feed_all(p, encode_header(0, Op.STATS, 0, Kind.REQUEST, 1))
    assert p.next_frame().payload == b""


def test_length_checked_before_payload():
    p = FrameParser(Kind.REQUEST)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        p.feed(encode_header(MAX_PAYLOAD + 1, Op.STATS, 0, Kind.REQUEST, 1), [])


def test_fds_must_match_the_header():
    p = FrameParser(Kind.REQUEST)
    r, w = os.pipe()
    fds = [OwnedFd(r), OwnedFd(w)]
    with pytest.raises(RemoteProtocolError, match="announces 1 fds, 2"):
        p.feed(encode_header(0, Op.PRIME_FD_TO_HANDLE, 1, Kind.REQUEST, 1), fds)
    assert all(fd.closed for fd in fds)


def test_fds_in_the_middle_of_a_frame_are_refused():
    p = FrameParser(Kind.REQUEST)
    p.feed(encode_header(8, Op.GEM_CLOSE, 0, Kind.REQUEST, 1), [])
    r, w = os.pipe()
    os.close(w)
    fd = OwnedFd(r)
    with pytest.raises(RemoteProtocolError, match="middle"):
        p.feed(b"1234", [fd])
    assert fd.closed


def test_request_with_status_and_wrong_kind():
    with pytest.raises(RemoteProtocolError):
        FrameParser(Kind.REQUEST).feed(encode_header(0, 1, 0, Kind.REQUEST, 1, status=5), [])
    with pytest.raises(RemoteProtocolError):
        FrameParser(Kind.REQUEST).feed(encode_header(0, 1, 0, Kind.REPLY, 1), [])


def test_chunk_crossing_a_frame_boundary_is_refused():
    p = FrameParser(Kind.REQUEST)
    with pytest.raises(RemoteProtocolError):
        p.feed(encode_header(0, 1, 0, Kind.REQUEST, 1) + b"x", [])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_frames_or_a_protocol_error(data):
    p = FrameParser(Kind.REQUEST)
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
