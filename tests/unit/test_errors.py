import errno

import pytest

import ugem
from ugem.errors import ERRNO_TO_ERROR, UgemError, error_from_errno


def test_errno_codes_are_unique_and_derived():
    classes = UgemError.__subclasses__()
    assert len({c.code for c in classes}) == len(classes)
    assert set(ERRNO_TO_ERROR.values()) == set(classes)


@pytest.mark.parametrize("code", sorted(ERRNO_TO_ERROR))
def test_round_trip_through_errno(code):
    exc = error_from_errno(code, "message naming 42")
    assert isinstance(exc, OSError) and isinstance(exc, ERRNO_TO_ERROR[code])
    assert exc.errno == code
    assert "42" in str(exc)


def test_unknown_errno_is_still_an_oserror():
    exc = error_from_errno(errno.EXDEV)
    assert type(exc) is UgemError and exc.errno == errno.EXDEV


def test_public_names():
    assert ugem.InvalidArgument().errno == errno.EINVAL
    assert ugem.QuotaExceeded().errno == errno.EDQUOT
