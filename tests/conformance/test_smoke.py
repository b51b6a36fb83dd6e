import ugem


def test_create_write_read(dev):
    h = dev.create(100)
    assert h == 1
    dev.pwrite(h, 0, b"abc")
    assert dev.pread(h, 0, 4) == b"abc\0"
    assert dev.info(h).size == ugem.PAGE_SIZE
