"""Exception state around Python calls made from a fault, and exceptions of
storeblk/loadblk."""

import sys
import traceback

import pytest
from conftest import PS, DataFile

from bigfile import WRITEOUT_MARKSTORED, WRITEOUT_STORE, BigFile


class Spy(DataFile):
    def loadblk(self, blk, buf):
        self.seen = (sys.exc_info(), sys.exc_info()[1] is None)
        # Raising and handling inside loadblk must not leak out.
        try:
            raise KeyError("inside loadblk")
        except KeyError:
            pass
        DataFile.loadblk(self, blk, buf)


def test_fault_in_except_block_keeps_handled_exception():
    f = Spy()
    m = memoryview(f.fileh_open().mmap(0, 1))
    try:
        raise ValueError("outer")
    except ValueError as e:
        before = sys.exc_info()
        assert m[0] == 0
        after = sys.exc_info()
        assert after[1] is e
        assert before == after
    assert sys.exc_info() == (None, None, None)


def test_loadblk_starts_with_clean_state():
    f = Spy()
    m = memoryview(f.fileh_open().mmap(0, 1))
    try:
        raise ValueError("outer")
    except ValueError:
        m[0]
    assert f.seen == ((None, None, None), True)


def test_fault_in_nested_except_blocks():
    f = Spy()
    m = memoryview(f.fileh_open().mmap(0, 2))
    try:
        raise ValueError("a")
    except ValueError as a:
        try:
            raise TypeError("b")
        except TypeError as b:
            m[0]
            assert sys.exc_info()[1] is b
        m[PS]
        assert sys.exc_info()[1] is a


def test_fault_in_generator_with_handled_exception_outside():
    f = Spy()
    m = memoryview(f.fileh_open().mmap(0, 1))

    def gen():
        yield m[0]
        yield sys.exc_info()[1]

    try:
        raise ValueError("outer")
    except ValueError as e:
        g = gen()
        assert next(g) == 0
        assert sys.exc_info()[1] is e
        assert next(g) is e


def test_fault_while_exception_propagates():
    # A fault inside `finally` while an exception is being raised: the
    # exception continues unchanged.
    f = DataFile()
    m = memoryview(f.fileh_open().mmap(0, 1))
    with pytest.raises(IndexError, match="propagating"):
        try:
            raise IndexError("propagating")
        finally:
            assert m[0] == 0


class FailingStore(DataFile):
    def storeblk(self, blk, buf):
        self.stores.append(blk)
        if blk in self.bad:
            raise OSError(5, "disk on fire at block %d" % blk)
        self.data[blk] = bytes(buf)


def test_storeblk_exception_raised_by_writeout():
    f = FailingStore()
    f.bad = {1}
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 3))
    m[0] = m[PS] = m[2 * PS] = 42
    with pytest.raises(OSError, match="disk on fire at block 1") as ei:
        fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
    assert ei.value.errno == 5
    names = [fr.name for fr in traceback.extract_tb(ei.value.__traceback__)]
    assert names[-1] == "storeblk", names
    assert f.stores == [0, 1]
    # Nothing lost: everything still dirty, the handle usable.
    assert fh.isdirty() and fh.dirty_blocks() == [0, 1, 2]
    assert m[PS] == 42
    with pytest.raises(OSError, match="disk on fire"):
        fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
    assert f.stores == [0, 1, 0, 1]
    f.bad = set()
    fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
    assert not fh.isdirty()
    assert f.data[1][0] == 42 and f.data[2][0] == 42


def test_storeblk_exception_while_handling_another():
    f = FailingStore()
    f.bad = {0}
    fh = f.fileh_open()
    memoryview(fh.mmap(0, 1))[0] = 1
    try:
        raise KeyError("handled")
    except KeyError as k:
        with pytest.raises(OSError) as ei:
            fh.dirty_writeout(WRITEOUT_STORE)
        assert sys.exc_info()[1] is k
    assert ei.value.__context__ is None or isinstance(ei.value.__context__, KeyError)


def test_storeblk_custom_exception_type():
    class Boom(Exception):
        pass

    class G(DataFile):
        def storeblk(self, blk, buf):
            raise Boom(blk, "x")

    fh = G().fileh_open()
    memoryview(fh.mmap(0, 1))[0] = 1
    with pytest.raises(Boom) as ei:
        fh.dirty_writeout(WRITEOUT_STORE)
    assert ei.value.args == (0, "x")


def test_storeblk_missing_raises_attributeerror():
    class G(BigFile):
        def loadblk(self, blk, buf):
            pass

    fh = G(PS).fileh_open()
    memoryview(fh.mmap(0, 1))[0] = 1
    with pytest.raises(AttributeError, match="storeblk"):
        fh.dirty_writeout(WRITEOUT_STORE)
    assert fh.isdirty()
    fh.dirty_discard()
