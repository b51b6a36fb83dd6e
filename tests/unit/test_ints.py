"""ugem/ints.py: the one integer check and the saturation rules that the client's arguments,
the wire's command records and the device's validation all use."""

from __future__ import annotations

import numpy as np
import pytest

import ugem
from ugem import ints
from ugem.client import args
from ugem.cmd import Fill
from ugem.gpu.commands import validate
from ugem.wire.commands import RECORD, encode_commands


@pytest.mark.parametrize("value", [True, np.True_, 1.0, float("nan"), "1", None, b"1"])
def test_a_non_integer_is_einval_naming_it(value):
    with pytest.raises(ugem.InvalidArgument, match=r"thing must be an integer, got .* \("):
        ints.integer(value, "thing")


def test_numpy_integers_are_integers():
    assert ints.integer(np.int8(-3), "x") == -3 and type(ints.integer(np.uint64(2**64 - 1), "x")) is int


@pytest.mark.parametrize(("value", "s64", "handle"), [
    (0, 0, 0), (1, 1, 1), (-1, -1, 0), (2**32 - 1, 2**32 - 1, 2**32 - 1), (2**32, 2**32, 0),
    (2**63 - 1, 2**63 - 1, 0), (2**63, 2**63 - 1, 0), (-(2**63) - 5, -(2**63), 0), (10**40, 2**63 - 1, 0)])
def test_saturation(value, s64, handle):
    assert (ints.s64(value), ints.handle(value)) == (s64, handle)
    assert (args.i64(value, "x"), args.ident(value)) == (s64, handle)  # the client's arguments


def test_command_records_saturate_alike():
    record = RECORD.unpack(encode_commands([Fill(dst=2**40, offset=2**70, length=-(2**70), byte=np.int64(7))]))
    assert record[2] == 0 and record[4:7] == (2**63 - 1, -(2**63), 7)


def test_every_layer_words_a_non_integer_alike():
    bad = Fill(dst=1, offset=0, length=1.5, byte=0)  # type: ignore[arg-type]
    with pytest.raises(ugem.InvalidArgument, match=r"command 0 \(Fill\): length must be an integer, got 1.5"):
        encode_commands([bad])
    with pytest.raises(ugem.InvalidArgument, match=r"Fill.length must be an integer, got 1.5"):
        validate(bad, lambda handle: None)  # type: ignore[arg-type,return-value]
