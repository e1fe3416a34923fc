"""loadblk/storeblk get the block's RAM page itself, not a copy, and lose it
after the call (the guarantees themselves: test_buffer.py)."""

import gc

import numpy as np
import pytest
from conftest import PS, DataFile

from bigfile import WRITEOUT_STORE, BigFile

def mapping_at(addr):
    """The /proc/self/maps line of the mapping holding `addr` (None if none)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.rstrip("\n")
    return None


def is_ram_file(line):
    """Whether a maps line is a shared mapping of a file (RAM files are the
    only ones here: memfd, or an unlinked file of a shmfs/hugetlbfs RAM)."""
    fields = None if line is None else line.split()
    return fields is not None and len(fields) >= 6 and fields[1][3] == "s"


def ram_file_mappings():
    gc.collect()
    with open("/proc/self/maps") as f:
        return [line for line in f if is_ram_file(line)]


def address(buf):
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def test_loadblk_buf_is_the_ram_page():
    seen = []

    class G(BigFile):
        def loadblk(self, blk, buf):
            buf[:] = bytes([blk + 3]) * len(buf)
            seen.append((address(buf), mapping_at(address(buf)), buf.readonly))

    m = memoryview(G(PS).fileh_open().mmap(0, 1))
    assert m[0] == 3 and m[PS - 1] == 3
    [(_, line, readonly)] = seen
    # A shared read-write mapping of the RAM file: what loadblk writes is
    # the page's content, with nothing copied after.
    assert is_ram_file(line), line
    assert line.split()[1] == "rw-s", line
    assert not readonly


def test_storeblk_buf_is_the_ram_page_read_only():
    seen = []

    class G(DataFile):
        def storeblk(self, blk, buf):
            seen.append((bytes(buf[:4]), mapping_at(address(buf)), buf.readonly))
            DataFile.storeblk(self, blk, buf)

    f = G()
    fh = f.fileh_open()
    memoryview(fh.mmap(0, 1))[:4] = b"abcd"
    fh.dirty_writeout(WRITEOUT_STORE)
    [(head, line, readonly)] = seen
    assert head == b"abcd"
    assert is_ram_file(line), line
    assert line.split()[1] == "r--s", line
    assert readonly


def test_view_kept_after_loadblk_is_zeros_at_the_same_address(capsys):
    class G(BigFile):
        def loadblk(self, blk, buf):
            buf[:] = bytes([blk + 5]) * len(buf)
            if blk == 0:
                self.kept = np.frombuffer(buf, dtype=np.uint8)
            else:
                self.addr1 = address(buf)

    f = G(PS)
    m = memoryview(f.fileh_open().mmap(0, 2))
    assert m[0] == 5
    assert "outlived the call" in capsys.readouterr().err
    addr0 = f.kept.ctypes.data
    line = mapping_at(addr0)
    assert line is not None and not is_ram_file(line), line
    assert f.kept[0] == 0 and f.kept[PS - 1] == 0
    f.kept[:] = 9
    assert m[0] == 5
    # The next load gets another address: the kept view never sees it.
    assert m[PS] == 6
    assert f.addr1 != addr0
    assert f.kept[0] == 9 and f.kept[1] == 9


def test_view_kept_after_storeblk_is_zeros_and_read_only(capsys):
    class G(DataFile):
        def storeblk(self, blk, buf):
            DataFile.storeblk(self, blk, buf)
            self.kept = np.frombuffer(buf, dtype=np.uint8)

    f = G()
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 1))
    m[0] = 42
    fh.dirty_writeout(WRITEOUT_STORE)
    assert "outlived the call" in capsys.readouterr().err
    assert f.kept[0] == 0
    assert not f.kept.flags.writeable
    assert m[0] == 42


def test_windows_are_reused_when_no_view_survives():
    addrs = []

    class G(BigFile):
        def loadblk(self, blk, buf):
            addrs.append(address(buf))

    m = memoryview(G(PS).fileh_open().mmap(0, 3))
    for i in range(3):
        m[i * PS]
    assert len(addrs) == 3 and len(set(addrs)) == 1, addrs


def test_nested_loads_get_their_own_windows():
    src = DataFile()
    src_m = memoryview(src.fileh_open().mmap(0, 2))
    addrs = {}

    class Src(DataFile):
        def loadblk(self, blk, buf):
            addrs["inner"] = address(buf)
            DataFile.loadblk(self, blk, buf)

    inner = memoryview(Src().fileh_open().mmap(0, 1))

    class G(BigFile):
        def loadblk(self, blk, buf):
            addrs["outer"] = address(buf)
            buf[:1] = bytes([inner[0] + src_m[PS] + 10])  # faults inside

    m = memoryview(G(PS).fileh_open().mmap(0, 1))
    assert m[0] == 11
    assert addrs["inner"] != addrs["outer"]


def test_closing_the_handle_leaves_no_ram_file_mapped():
    before = len(ram_file_mappings())
    f = DataFile()
    fh = f.fileh_open()
    vma = fh.mmap(0, 2)
    m = memoryview(vma)
    assert m[0] == 0 and m[PS] == 1
    m.release()
    vma.close()
    del m, vma
    fh.close()
    assert len(ram_file_mappings()) == before, ram_file_mappings()


@pytest.mark.parametrize("blocks", [1, 3])
def test_large_blocks_are_the_page(blocks):
    # Pages of 2 MiB: the window is aligned so a huge page maps whole.
    bs = 2 << 20
    seen = []

    class G(BigFile):
        def loadblk(self, blk, buf):
            a = np.frombuffer(buf, dtype=np.uint8)
            a[:] = blk + 1
            seen.append(address(buf))

    m = memoryview(G(bs).fileh_open().mmap(0, blocks))
    for b in range(blocks):
        assert m[b * bs] == b + 1 and m[b * bs + bs - 1] == b + 1
    assert all(a % bs == 0 for a in seen), seen
