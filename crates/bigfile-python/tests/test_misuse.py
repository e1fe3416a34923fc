"""Misuse raises with a clear message; nothing aborts the interpreter."""

import pytest
from conftest import PS, DataFile

from bigfile import RAM, BigFile


@pytest.mark.parametrize("blksize", [0, -PS, PS + 1, PS // 2, 3])
def test_blksize_not_page_multiple(blksize):
    with pytest.raises(ValueError, match="blksize"):
        DataFile(blksize)


def test_blksize_wrong_type():
    with pytest.raises(TypeError):
        DataFile("4096")


def test_subclass_without_loadblk():
    class NoLoad(BigFile):
        pass

    with pytest.raises(TypeError, match="loadblk"):
        NoLoad(PS).fileh_open()
    with pytest.raises(TypeError, match="loadblk"):
        BigFile(PS).fileh_open()


def test_loadblk_not_callable():
    class Bad(BigFile):
        loadblk = 5

    with pytest.raises(TypeError, match="loadblk"):
        Bad(PS).fileh_open()


@pytest.mark.parametrize(
    "pgoffset,pglen,exc",
    [
        (-1, 1, ValueError),
        (0, -1, ValueError),
        (0, 0, ValueError),
        (2**64, 1, ValueError),
        (2**70, 1, ValueError),
        (2**64 - 1, 2, ValueError),
        (0, 2**62, ValueError),
        (0.5, 1, TypeError),
        ("0", 1, TypeError),
        (None, 1, TypeError),
    ],
)
def test_mmap_bad_ranges(f, pgoffset, pglen, exc):
    fh = f.fileh_open()
    with pytest.raises(exc):
        fh.mmap(pgoffset, pglen)
    assert memoryview(fh.mmap(0, 1))[0] == 0, "handle still usable"


@pytest.mark.parametrize("flags", [0, 4, 7, -1, 2**40])
def test_writeout_bad_flags(f, flags):
    fh = f.fileh_open()
    with pytest.raises(ValueError, match="flags"):
        fh.dirty_writeout(flags)


def test_writeout_flags_wrong_type(f):
    with pytest.raises(TypeError):
        f.fileh_open().dirty_writeout("store")


@pytest.mark.parametrize("pgoffset", [-1, 2**64])
def test_invalidate_bad_offset(f, pgoffset):
    with pytest.raises(ValueError):
        f.fileh_open().invalidate_page(pgoffset)


def test_invalidate_page_not_loaded_is_fine(f):
    f.fileh_open().invalidate_page(12345)


def test_bad_ram_arguments(f):
    with pytest.raises(ValueError, match="RAM spec"):
        f.fileh_open(ram="no-such-backend")
    with pytest.raises(TypeError, match="ram must be"):
        f.fileh_open(ram=3)
    with pytest.raises(ValueError, match="page size"):
        f.fileh_open(ram=RAM("memfd,pagesize=%d" % (2 * PS)))
    with pytest.raises(ValueError, match="budget"):
        f.fileh_open(ram=RAM("memfd,pagesize=%d" % PS), budget=PS)
    with pytest.raises(ValueError, match="RAM spec"):
        RAM("memfd,pagesize=banana")


def test_prefault_bad_range(f):
    vma = f.fileh_open().mmap(0, 1)
    with pytest.raises(ValueError):
        vma.prefault(0, PS + 1)
    with pytest.raises(ValueError):
        vma.prefault(10, 5)


def test_set_load_policy_bad(f):
    fh = f.fileh_open()
    with pytest.raises(ValueError):
        fh.set_load_policy(0)
    with pytest.raises(ValueError):
        fh.set_load_policy(1, -1.0)


def test_close_twice_and_use_after_close(f):
    fh = f.fileh_open()
    fh.close()
    fh.close()
    for call in (fh.isdirty, fh.dirty_discard, lambda: fh.dirty_writeout(1), fh.dirty_blocks):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_vma_use_after_unmap(f):
    vma = f.fileh_open().mmap(0, 1)
    vma.close()
    vma.close()
    with pytest.raises(ValueError, match="unmapped"):
        memoryview(vma)
    with pytest.raises(ValueError, match="unmapped"):
        vma.prefault()
    assert len(vma) == PS
    assert "unmapped" in repr(vma)


def test_base_class_attributes_not_settable_on_base():
    b = BigFile(PS)
    with pytest.raises(AttributeError):
        b.blksize = 1
