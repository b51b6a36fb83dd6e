"""wire/commands.py and gpu/commands.py shortcuts for the common command (a Fill, or a Copy,
of plain ints): they must give exactly what the general code gives, for every value."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import ugem
from ugem.cmd import Blit, Copy, Fill, SemaphoreWait
from ugem.gpu.commands import ObjView, validate
from ugem.wire.commands import RECORD, decode_commands, encode_commands

EDGES = [-(2**63) - 1, -(2**63), -1, 0, 1, 255, 256, 4095, 4096, 2**32 - 1, 2**32, 2**63 - 1, 2**63]


def _general(cmd):
    """The same command with numpy integers (where they fit), which no shortcut takes."""
    fields = {name: getattr(cmd, name) for name in cmd.__slots__}
    return type(cmd)(**{k: np.int64(v) if -(2**63) <= v < 2**63 else v for k, v in fields.items()})


def test_every_command_type_round_trips():
    cmds = [Fill(dst=1, offset=2, length=3, byte=4), Copy(src=1, src_offset=2, dst=3, dst_offset=4, length=5),
            Blit(src=1, dst=2, src_x=3, src_y=4, dst_x=5, dst_y=6, width=7, height=8, cpp=9, src_pitch=10,
                 dst_pitch=11), SemaphoreWait(obj=1, offset=2, value=3), Fill(dst=9, offset=0, length=1, byte=0)]
    assert decode_commands(encode_commands(cmds)) == cmds


@pytest.mark.parametrize("field", range(1, 13))
def test_a_fill_record_with_padding_or_an_unused_field_set_is_einval(field):
    values = [1, 0, 7, 0, 0, 4096, 9, 0, 0, 0, 0, 0, 0]
    assert decode_commands(RECORD.pack(*values)) == [Fill(dst=7, offset=0, length=4096, byte=9)]
    if field in (2, 4, 5, 6):  # dst, offset, length, byte: used
        return
    values[field] = 1
    with pytest.raises(ugem.InvalidArgument, match="command 0: nonzero padding or unused fields"):
        decode_commands(RECORD.pack(*values))


def test_a_fill_encodes_as_the_general_path_does():
    for dst, value in itertools.product(EDGES, EDGES):
        for fill in (Fill(dst=dst, offset=value, length=4096, byte=1), Fill(dst=5, offset=0, length=value, byte=value)):
            assert encode_commands([fill]) == encode_commands([_general(fill)])


@pytest.mark.parametrize("make", [
    lambda a, b: Fill(dst=1, offset=a, length=b, byte=a),
    lambda a, b: Fill(dst=1, offset=0, length=a, byte=b),
    lambda a, b: Copy(src=1, src_offset=a, dst=2, dst_offset=b, length=64),
    lambda a, b: Copy(src=1, src_offset=0, dst=2, dst_offset=a, length=b),
])
def test_validate_answers_as_the_general_checks_do(make):
    views = {1: ObjView(size=4096), 2: ObjView(size=8192)}
    for a, b in itertools.product([-1, 0, 1, 255, 256, 4032, 4095, 4096, 8192], repeat=2):
        outcomes = []
        for cmd in (make(a, b), _general(make(a, b))):
            try:
                validate(cmd, views.__getitem__)
                outcomes.append(None)
            except ugem.InvalidArgument as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1], make(a, b)
