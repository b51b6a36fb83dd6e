import ugem
from ugem.core.requests import BY_OP, REQUESTS
from ugem.wire.frames import Op


def test_all_is_sorted_case_insensitively_by_kind_and_complete():
    names = set(ugem.__all__)
    assert len(names) == len(ugem.__all__), "duplicates in __all__"
    public = {n for n in vars(ugem) if not n.startswith("_")} - {
        "client", "config", "constants", "errors", "manager", "core", "wire", "backing", "fd", "paths", "daemon",
        "testing", "cli", "mm", "gpu", "top", "fsview", "bufview", "serve_options", "dask", "ints", "scm",
        "address", "parts", "spin"}
    assert public == names
    constants = [n for n in ugem.__all__ if n.isupper()]
    others = [n for n in ugem.__all__ if not n.isupper()]
    assert constants == sorted(constants) and others == sorted(others)


def test_request_table_has_one_row_per_op():
    ops = [d.op for d in REQUESTS]
    assert len(ops) == len(set(ops))
    assert set(ops) == set(Op) - {Op.HELLO, Op.LAZY_CHANNEL}  # (the connection-level ops: daemon/connection.py)
    assert all(BY_OP[d.op] is d for d in REQUESTS)


def test_every_handler_has_the_shared_signature():
    import inspect

    for desc in REQUESTS:
        params = list(inspect.signature(desc.handler).parameters)
        assert params == ["core", "call" if desc.takes_call else "client", "req"], desc.op
