"""bigfile.file_file: BigFile_File over an OS file, native and Python I/O."""

import mmap
import os
import time

import numpy as np
import pytest

from bigfile import WRITEOUT_MARKSTORED, WRITEOUT_STORE, BigFile
from bigfile._bigfile import FileBigFile
from bigfile.file_file import BigFile_File, BigFile_File_PyIO

PS = mmap.PAGESIZE
BLK = 4 * PS
WRITEOUT = WRITEOUT_STORE | WRITEOUT_MARKSTORED

# Both ways of serving the file must behave the same.
CLASSES = [BigFile_File, BigFile_File_PyIO]


def pattern(nbytes, seed=0):
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


@pytest.fixture
def datafile(tmp_path):
    """A file of 2.5 blocks of random bytes."""
    path = tmp_path / "data.bin"
    path.write_bytes(pattern(2 * BLK + BLK // 2))
    return path


@pytest.mark.parametrize("cls", CLASSES)
def test_reads_blocks_and_zeros_past_eof(cls, datafile):
    data = datafile.read_bytes()
    f = cls(str(datafile), BLK)
    assert isinstance(f, BigFile) and f.blksize == BLK
    with f.fileh_open() as fh, fh.mmap(0, 5) as vma:
        m = memoryview(vma)
        assert bytes(m[: len(data)]) == data
        assert bytes(m[len(data) :]) == bytes(5 * BLK - len(data))
        m.release()
        # Reading does not change the file.
        assert not fh.isdirty()
    assert datafile.read_bytes() == data


@pytest.mark.parametrize("cls", CLASSES)
def test_writeout_writes_blocks_and_extends_file(cls, datafile):
    data = bytearray(datafile.read_bytes())
    f = cls(datafile, BLK)
    with f.fileh_open() as fh:
        with fh.mmap(0, 6) as vma:
            m = memoryview(vma)
            m[10:20] = b"x" * 10
            m[5 * BLK + 3] = 0xAB
            m.release()
        assert fh.dirty_blocks() == [0, 5]
        # Nothing reaches the file before the writeout.
        assert datafile.read_bytes() == data
        fh.dirty_writeout(WRITEOUT)
        assert not fh.isdirty()
    data[10:20] = b"x" * 10
    expect = bytes(data) + bytes(6 * BLK - len(data))
    expect = expect[: 5 * BLK + 3] + b"\xab" + expect[5 * BLK + 4 :]
    got = datafile.read_bytes()
    # Block 5 is written whole, blocks 3 and 4 are a hole of zeros.
    assert len(got) == 6 * BLK
    assert got == expect


@pytest.mark.parametrize("cls", CLASSES)
def test_discard_leaves_file_alone(cls, datafile):
    data = datafile.read_bytes()
    f = cls(datafile, BLK)
    with f.fileh_open() as fh:
        with fh.mmap(0, 1) as vma:
            memoryview(vma)[0] = data[0] ^ 0xFF
        fh.dirty_discard()
        with fh.mmap(0, 1) as vma:
            assert memoryview(vma)[0] == data[0]
    assert datafile.read_bytes() == data


def test_path_kinds_and_fd_ownership(datafile):
    data = datafile.read_bytes()
    for arg in (str(datafile), os.fsencode(datafile), datafile):
        assert BigFile_File(arg, BLK).path == str(datafile)
    fd = os.open(datafile, os.O_RDWR)
    f = BigFile_File(fd, BLK)
    # As io.FileIO(fd, "r+"): the object takes the descriptor over ...
    assert f.fileno() == fd and f.path == str(datafile)
    fh = f.fileh_open()
    del f
    # ... and it stays open while a handle needs it,
    os.fstat(fd)
    with fh.mmap(0, 1) as vma:
        assert bytes(memoryview(vma)[:16]) == data[:16]
    fh.close()
    del fh
    # then is closed.
    with pytest.raises(OSError):
        os.fstat(fd)


def test_handle_outlives_file_object(datafile):
    data = datafile.read_bytes()
    fh = BigFile_File(datafile, BLK).fileh_open()
    with fh.mmap(1, 1) as vma:
        assert bytes(memoryview(vma)[:8]) == data[BLK : BLK + 8]
    fh.close()


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        BigFile_File(tmp_path / "absent", BLK)
    with pytest.raises(IsADirectoryError):
        BigFile_File(tmp_path, BLK)
    (tmp_path / "x").write_bytes(b"")
    with pytest.raises(ValueError, match="blksize"):
        BigFile_File(tmp_path / "x", PS + 1)
    with pytest.raises(ValueError, match="blksize"):
        BigFile_File(os.open(tmp_path / "x", os.O_RDWR), 0)
    with pytest.raises(TypeError, match="path"):
        FileBigFile(1.5, BLK)
    with pytest.raises(OSError):
        FileBigFile(10**6, BLK)
    with pytest.raises(ValueError):
        FileBigFile(-1, BLK)


def test_storeblk_error_keeps_changes_dirty(tmp_path):
    path = tmp_path / "ro.bin"
    path.write_bytes(b"\x01" * BLK)
    # A read-only descriptor: loads work, stores fail with EBADF.
    f = FileBigFile(os.open(path, os.O_RDONLY), BLK)
    with f.fileh_open() as fh:
        with fh.mmap(0, 2) as vma:
            m = memoryview(vma)
            assert m[0] == 1
            m[0] = 2
            m[BLK] = 3
            m.release()
        with pytest.raises(OSError) as e:
            fh.dirty_writeout(WRITEOUT)
        assert e.value.errno == 9  # EBADF
        assert str(path) in str(e.value)
        # Nothing lost: both blocks are still dirty and still hold the changes.
        assert fh.dirty_blocks() == [0, 1]
        with fh.mmap(0, 2) as vma:
            assert memoryview(vma)[0] == 2 and memoryview(vma)[BLK] == 3
        fh.dirty_discard()
    assert path.read_bytes() == b"\x01" * BLK


def test_native_methods_callable_from_python(datafile):
    data = datafile.read_bytes()
    f = BigFile_File(datafile, BLK)
    buf = bytearray(BLK)
    f.loadblk(1, buf)
    assert bytes(buf) == data[BLK : 2 * BLK]
    f.loadblk(2, buf)
    assert bytes(buf) == data[2 * BLK :] + bytes(BLK // 2)
    f.storeblk(7, b"z" * BLK)
    assert datafile.read_bytes()[7 * BLK :] == b"z" * BLK
    with pytest.raises(ValueError, match="blksize"):
        f.loadblk(0, bytearray(BLK - 1))
    with pytest.raises(TypeError, match="writable"):
        f.loadblk(0, bytes(BLK))
    with pytest.raises(ValueError, match="contiguous"):
        f.loadblk(0, memoryview(bytearray(2 * BLK))[::2])
    f.sync()


def test_subclass_overriding_loadblk_is_called(datafile):
    """A subclass that overrides loadblk gets the Python path; super()
    reaches the native read."""
    data = datafile.read_bytes()

    class Counting(BigFile_File):
        def loadblk(self, blk, buf):
            self.loads = getattr(self, "loads", []) + [blk]
            super().loadblk(blk, buf)
            memoryview(buf)[0] = 0xEE

    f = Counting(datafile, BLK)
    with f.fileh_open() as fh, fh.mmap(0, 2) as vma:
        m = memoryview(vma)
        assert m[0] == 0xEE and bytes(m[1:BLK]) == data[1:BLK]
        assert m[BLK] == 0xEE
        m.release()
    assert f.loads == [0, 1]


def test_native_loads_run_without_python(datafile):
    """Blocks of a native file load in Rust from a thread Python never saw
    and from one that released the GIL (no Python loadblk is involved)."""
    from bigfile._bigfile import _read_in_new_thread, _read_nogil

    data = datafile.read_bytes()
    f = BigFile_File(datafile, BLK)
    with f.fileh_open() as fh, fh.mmap(0, 3) as vma:
        assert _read_in_new_thread(vma, BLK + 5) == data[BLK + 5]
        assert _read_nogil(vma, 2 * BLK + 1) == data[2 * BLK + 1]
        assert fh.stats()["loads"] == 2


def test_dispatch_is_decided_at_open(datafile):
    """A handle of a class that does not override loadblk never calls
    Python for a block, even if a loadblk appears on the class later; a
    handle opened after that calls it."""
    data = datafile.read_bytes()
    calls = []

    class Probe(BigFile_File):
        pass

    def loadblk(self, blk, buf):
        calls.append(blk)
        BigFile_File.loadblk(self, blk, buf)

    f = Probe(datafile, BLK)
    native = f.fileh_open()
    Probe.loadblk = loadblk
    python = f.fileh_open()
    with native.mmap(0, 2) as vma:
        assert bytes(memoryview(vma)[BLK : BLK + 4]) == data[BLK : BLK + 4]
    assert calls == []
    with python.mmap(0, 2) as vma:
        assert bytes(memoryview(vma)[BLK : BLK + 4]) == data[BLK : BLK + 4]
    assert calls == [1]
    native.close()
    python.close()


@pytest.mark.parametrize("cls", CLASSES)
def test_a_scan_is_detected_and_read_ahead_for_native_reads(cls, tmp_path):
    """A forward scan under the default advice is detected (a stream) and,
    for blocks read in Rust, read ahead on worker threads; a Python loadblk
    is not read ahead. advise("random") turns both off."""
    path = tmp_path / "scan.bin"
    data = pattern(64 * BLK, 1)
    path.write_bytes(data)
    f = cls(str(path), BLK)
    for advice in ["normal", "random"]:
        with f.fileh_open(ram="memfd", budget=32 * BLK) as fh, fh.mmap(0, 64) as vma:
            vma.advise(advice)
            m = memoryview(vma)
            read_ahead = advice == "normal" and cls is BigFile_File
            for blk in range(64):
                assert bytes(m[blk * BLK : (blk + 1) * BLK]) == data[blk * BLK : (blk + 1) * BLK]
                if blk == 3 and read_ahead:
                    # The workers' loads of the blocks asked so far: a
                    # fault on a block whose job a busy (or not yet
                    # scheduled) worker has not begun loads it itself, so
                    # without this wait a loaded machine may leave the
                    # workers nothing.
                    deadline = time.monotonic() + 60
                    while fh.stats()["readahead_loads"] == 0:
                        assert time.monotonic() < deadline, "read-ahead never loads"
                        time.sleep(0.001)
            m.release()
            st = fh.stats()
            assert st["streams"] == (advice == "normal")
            if read_ahead:
                assert st["readahead_loads"] > 0 and st["readahead_hits"] > 0, st
            else:
                assert st["readahead_loads"] == 0, st
            assert st["readahead_wasted"] <= st["readahead_loads"]
