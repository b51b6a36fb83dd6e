"""flink / open_name: global names and their lifetime (SPEC §2, §5; gem-reference §1.2
"Name lifetime", §1.3 GEM_FLINK / GEM_OPEN; IGT gem_flink_basic, gem_close)."""

from __future__ import annotations

import errno
import os

import pytest

import ugem

PAGE = ugem.PAGE_SIZE
NOBODY = 65534  # the uid the cross-uid tests drop to


# -- flink -----------------------------------------------------------------------------


def test_flink_twice_gives_the_same_name(dev):
    # IGT gem_flink_basic double-flink
    h = dev.create(PAGE)
    name = dev.flink(h)
    assert name > 0
    assert dev.flink(h) == name


def test_every_handle_of_an_object_flinks_to_its_one_name(env):
    a, b = env.open(), env.open()
    h = a.create(PAGE)
    name = a.flink(h)
    hb, _ = b.open_name(name)
    assert b.flink(hb) == name
    h2, _ = a.open_name(name)
    assert a.flink(h2) == name
    assert b.info(hb).name == name


@pytest.mark.parametrize("handle", [0, 2, 0x10101010, 2**32])
def test_flink_of_an_unknown_handle_is_enoent(dev, errno_of, handle):
    # IGT gem_flink_basic bad-flink
    dev.create(PAGE)
    assert errno_of(dev.flink, handle) == errno.ENOENT


def test_names_are_lowest_free_from_one(make_env):
    dev = make_env().open()
    handles = [dev.create(PAGE) for _ in range(4)]
    assert [dev.flink(h) for h in handles] == [1, 2, 3, 4]
    dev.close_handle(handles[1])  # frees name 2
    dev.close_handle(handles[0])  # frees name 1
    fresh = [dev.create(PAGE) for _ in range(3)]
    assert [dev.flink(h) for h in fresh] == [1, 2, 5]


def test_names_are_manager_wide(env):
    a, b = env.open(), env.open()
    na = a.flink(a.create(PAGE))
    nb = b.flink(b.create(PAGE))
    assert na != nb


# -- open_name -------------------------------------------------------------------------


def test_open_name_gives_a_new_handle_every_call(dev):
    # IGT gem_close many-handles-one-vma: no dedup for GEM_OPEN, even in the same client
    h = dev.create(3 * PAGE)
    dev.pwrite(h, 0, b"one object")
    name = dev.flink(h)
    opened = [dev.open_name(name) for _ in range(5)]
    handles = [handle for handle, _ in opened]
    assert len(set(handles) | {h}) == 6
    assert all(size == 3 * PAGE for _, size in opened)
    for handle in handles:
        assert dev.pread(handle, 0, 10) == b"one object"
        assert dev.info(handle).name == name


def test_clones_outlive_the_original_and_die_one_by_one(dev, errno_of):
    h = dev.create(PAGE)
    name = dev.flink(h)
    clones = [dev.open_name(name)[0] for _ in range(3)]
    dev.close_handle(h)
    assert errno_of(dev.info, h) == errno.ENOENT
    for i, clone in enumerate(clones):
        dev.pwrite(clone, 0, bytes([i]))
        for other in clones[i:]:
            assert dev.pread(other, 0, 1) == bytes([i])
        dev.close_handle(clone)
        assert errno_of(dev.pread, clone, 0, 1) == errno.ENOENT


def test_open_name_in_another_client_sees_the_data(env):
    a, b = env.open(), env.open()
    h = a.create(2 * PAGE)
    a.pwrite(h, PAGE, b"cross-client")
    hb, size = b.open_name(a.flink(h))
    assert size == 2 * PAGE
    assert b.info(hb).size == 2 * PAGE
    assert b.pread(hb, PAGE, 12) == b"cross-client"


@pytest.mark.parametrize("name", [0, 1, 0x10101010, 2**32, -1])
def test_open_of_an_unknown_name_is_enoent(dev, errno_of, name):
    # IGT gem_flink_basic bad-open; names 0 and never-issued ones
    dev.create(PAGE)  # an object without a name
    assert errno_of(dev.open_name, name) == errno.ENOENT


def test_failed_open_allocates_no_handle(dev, errno_of):
    assert errno_of(dev.open_name, 7) == errno.ENOENT
    assert dev.create(PAGE) == 1


# -- lifetime --------------------------------------------------------------------------


def test_name_lives_while_any_client_holds_a_handle(env):
    # IGT gem_flink_basic flink-lifetime: creator goes away, the name stays valid
    creator, holder = env.open(), env.open()
    h = creator.create(PAGE)
    creator.pwrite(h, 0, b"outlives its creator")
    name = creator.flink(h)
    holder.open_name(name)
    creator.close()
    late = env.open()
    hl, size = late.open_name(name)
    assert size == PAGE
    assert late.pread(hl, 0, 20) == b"outlives its creator"


def test_name_dies_with_the_last_handle(env, errno_of):
    a, b = env.open(), env.open()
    h = a.create(PAGE)
    name = a.flink(h)
    hb, _ = b.open_name(name)
    a.close_handle(h)
    assert b.open_name(name)[0] != hb  # still there: b holds handles
    b.close()
    assert errno_of(a.open_name, name) == errno.ENOENT


def test_a_mapping_does_not_keep_the_name(env, errno_of):
    dev, other = env.open(), env.open()
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"mapped")
    name = dev.flink(h)
    view = dev.mmap(h)
    dev.close_handle(h)
    assert bytes(view[:6]) == b"mapped"  # the object lives on in the mapping ...
    assert errno_of(other.open_name, name) == errno.ENOENT  # ... but its name is gone
    assert errno_of(dev.open_name, name) == errno.ENOENT
    view[:6] = b"MAPPED"
    assert bytes(view[:6]) == b"MAPPED"


def test_an_exported_fd_does_not_keep_the_name(env, errno_of, fds):
    dev = env.open()
    h = dev.create(PAGE)
    name = dev.flink(h)
    fd = fds.add(dev.export(h))
    dev.close_handle(h)
    assert errno_of(dev.open_name, name) == errno.ENOENT
    h2 = dev.import_fd(fd)
    assert dev.info(h2).name == 0  # re-adopted objects start without a name


def test_a_vanished_name_can_be_reissued_to_another_object(make_env, errno_of):
    dev = make_env().open()
    first = dev.create(PAGE)
    assert dev.flink(first) == 1
    dev.close_handle(first)
    assert errno_of(dev.open_name, 1) == errno.ENOENT
    second = dev.create(2 * PAGE)
    assert dev.flink(second) == 1
    assert dev.open_name(1)[1] == 2 * PAGE


# -- the uid rule (daemon only: every embedded client has this process's uid) ----------


def _share_socket_with_everyone(env):
    os.chmod(env.daemon.directory, 0o755)
    return env.daemon.path


def test_open_name_across_uids_is_eacces(mode, make_env, as_user):
    if mode != "daemon":
        pytest.skip("clients of an embedded manager all have this process's uid")
    env = make_env(socket_mode="0666")
    path = _share_socket_with_everyone(env)
    root = env.open()
    h = root.create(PAGE)
    root.pwrite(h, 0, b"root's")
    name = root.flink(h)

    def as_nobody():
        dev = ugem.connect(path)
        try:
            dev.open_name(name)
        except ugem.UgemError as exc:
            return {"errno": exc.errno}
        return {"errno": 0}

    with as_user(NOBODY, as_nobody) as got:
        assert got["errno"] == errno.EACCES
    # root's own client is unaffected, and a root client may open any name
    assert env.open().open_name(name)[1] == PAGE


def test_names_of_another_uid_open_for_the_same_uid_and_for_root(mode, make_env, as_user):
    if mode != "daemon":
        pytest.skip("clients of an embedded manager all have this process's uid")
    env = make_env(socket_mode="0666")
    path = _share_socket_with_everyone(env)
    keep = []  # the child's clients stay connected until the parent is done

    def nobody_creates_and_reopens():
        creator = ugem.connect(path)
        h = creator.create(PAGE)
        creator.pwrite(h, 0, b"nobody's")
        name = creator.flink(h)
        second = ugem.connect(path)  # another client, same uid
        h2, _ = second.open_name(name)
        keep.extend([creator, second])
        return {"name": name, "data": second.pread(h2, 0, 8).decode(),
                "uid": [c["uid"] for c in second.stats()["per_client"]]}

    with as_user(NOBODY, nobody_creates_and_reopens) as got:
        assert got["data"] == "nobody's"
        assert NOBODY in got["uid"]
        root = env.open()
        hr, size = root.open_name(got["name"])  # root may open anything
        assert size == PAGE
        assert root.pread(hr, 0, 8) == b"nobody's"
