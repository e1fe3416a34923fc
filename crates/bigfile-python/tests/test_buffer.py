"""After loadblk/storeblk returns, nothing keeps the block's memory."""

import gc
import sys

import numpy as np
import pytest
from conftest import PS, DataFile

from bigfile import WRITEOUT_STORE, BigFile


def test_memoryview_kept_by_loadblk_is_released():
    class G(DataFile):
        def loadblk(self, blk, buf):
            DataFile.loadblk(self, blk, buf)
            self.kept = buf

    f = G()
    m = memoryview(f.fileh_open().mmap(0, 1))
    assert m[0] == 0
    with pytest.raises(ValueError, match="released"):
        f.kept[0]
    with pytest.raises(ValueError):
        f.kept[0] = 1
    assert m[0] == 0


def test_underlying_object_refuses_new_buffers():
    class G(DataFile):
        def loadblk(self, blk, buf):
            DataFile.loadblk(self, blk, buf)
            self.obj = buf.obj

    f = G()
    memoryview(f.fileh_open().mmap(0, 1))[0]
    with pytest.raises(BufferError, match="only during that call"):
        memoryview(f.obj)


def test_frame_kept_by_traceback_gets_stub():
    class G(DataFile):
        def loadblk(self, blk, buf):
            DataFile.loadblk(self, blk, buf)
            self.helper(buf)

        def helper(self, data):
            try:
                raise RuntimeError("keep my frame")
            except RuntimeError as e:
                self.exc = e

    f = G()
    m = memoryview(f.fileh_open().mmap(0, 1))
    assert m[0] == 0
    tb = f.exc.__traceback__
    frame = tb.tb_frame
    assert frame.f_code.co_name == "helper"
    assert frame.f_locals["data"] == "<pybuf>"
    # the loadblk frame that called helper, reachable through f_back? It
    # has finished; if still referenced its buffer is the stub as well.
    if frame.f_back is not None and frame.f_back.f_code.co_name == "loadblk":
        assert frame.f_back.f_locals["buf"] == "<pybuf>"


def test_loadblk_exception_frames_get_stub():
    class G(DataFile):
        def loadblk(self, blk, buf):
            DataFile.loadblk(self, blk, buf)
            try:
                raise KeyError("x")
            except KeyError as e:
                self.tb = e.__traceback__

    f = G()
    memoryview(f.fileh_open().mmap(0, 1))[0]
    assert f.tb.tb_frame.f_locals["buf"] == "<pybuf>"


def test_storeblk_exception_frames_get_stub():
    class G(DataFile):
        def storeblk(self, blk, buf):
            raise OSError("fail")

    fh = G().fileh_open()
    memoryview(fh.mmap(0, 1))[0] = 1
    with pytest.raises(OSError) as ei:
        fh.dirty_writeout(WRITEOUT_STORE)
    tb = ei.value.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_name == "storeblk"
    assert tb.tb_frame.f_locals["buf"] == "<pybuf>"


def test_reference_cycle_holding_buffer_is_collected():
    class G(DataFile):
        def loadblk(self, blk, buf):
            DataFile.loadblk(self, blk, buf)
            cyc = [buf]
            cyc.append(cyc)

    f = G()
    m = memoryview(f.fileh_open().mmap(0, 2))
    assert m[0] == 0 and m[PS] == 1


def test_numpy_view_kept_by_loadblk_cannot_reach_page(capsys):
    class G(BigFile):
        def loadblk(self, blk, buf):
            a = np.frombuffer(buf, dtype=np.uint8)
            a[:] = 7
            self.a = a
            self.slice = buf[10:20]

    f = G(PS)
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 1))
    assert m[0] == 7
    err = capsys.readouterr().err
    assert "outlived the call" in err
    # The stale views see zeros, and writing through them changes nothing
    # in the mapping and dirties nothing.
    assert f.a[0] == 0 and f.slice[0] == 0
    f.a[:] = 9
    f.slice[0] = 9
    assert m[0] == 7 and m[10] == 7
    assert not fh.isdirty()


def test_gc_with_raising_del_during_cleanup():
    class Bomb:
        def __del__(self):
            try:
                raise ZeroDivisionError("handled in __del__")
            except ZeroDivisionError:
                pass
            # leaves garbage that needs the collector again
            x = []
            x.append(x)

    class G(DataFile):
        def loadblk(self, blk, buf):
            DataFile.loadblk(self, blk, buf)
            b = Bomb()
            b.cycle = b
            b.buf = buf

    f = G()
    m = memoryview(f.fileh_open().mmap(0, 2))
    try:
        raise KeyError("outer")
    except KeyError as e:
        assert m[0] == 0
        assert sys.exc_info()[1] is e
        assert m[PS] == 1
        assert sys.exc_info()[1] is e


def test_loadblk_running_full_gc_collect():
    class G(DataFile):
        def loadblk(self, blk, buf):
            gc.collect()
            DataFile.loadblk(self, blk, buf)

    f = G()
    m = memoryview(f.fileh_open().mmap(0, 3))
    assert [m[0], m[PS], m[2 * PS]] == [0, 1, 2]


def test_loadblk_dropping_last_reference_to_another_vma():
    f = DataFile()
    fh = f.fileh_open()
    other = fh.mmap(5, 1)
    memoryview(other)[0]

    class G(DataFile):
        def loadblk(self, blk, buf):
            DataFile.loadblk(self, blk, buf)
            holder.pop()  # the last reference: unmapped inside the fault
            gc.collect()

    holder = [other]
    del other
    g = G()
    m = memoryview(g.fileh_open().mmap(0, 1))
    assert m[0] == 0
    assert holder == []
    assert memoryview(fh.mmap(5, 1))[0] == 5


def test_loadblk_reading_another_mapping():
    src = DataFile()
    src_m = memoryview(src.fileh_open().mmap(0, 4))

    class G(BigFile):
        def loadblk(self, blk, buf):
            # Nested faults: src's pages load from inside this loadblk.
            buf[:] = src_m[(blk + 1) * PS : (blk + 2) * PS]

    m = memoryview(G(PS).fileh_open().mmap(0, 2))
    assert m[0] == 1 and m[PS] == 2


def test_locals_dict_kept_by_loadblk_is_revoked():
    class G(DataFile):
        def loadblk(self, blk, buf):
            DataFile.loadblk(self, blk, buf)
            self.locs = dict(locals())

    f = G()
    m = memoryview(f.fileh_open().mmap(0, 1))
    assert m[0] == 0
    kept = f.locs["buf"]
    assert kept == "<pybuf>" or pytest.raises(ValueError, kept.__getitem__, 0)
