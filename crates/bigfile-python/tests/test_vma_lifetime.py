"""A mapping's memory stays valid while any Python object can reach it:
numpy arrays over a VMA outlive `vma.close()` reading zeros, never another
file mapped later at the same addresses; arrays that hold a buffer of the
VMA make `close()` refuse. In a fresh interpreter each (before the fix, the
first read after close segfaulted or read the other file)."""

import textwrap

import pytest
from conftest import run_py

COMMON = """
import gc, mmap, weakref
import numpy as np
from bigfile import BigFile
PS = mmap.PAGESIZE

class Fill(BigFile):
    '''Every byte of every block is `value`.'''
    def __new__(cls, value):
        obj = BigFile.__new__(cls, PS)
        obj.value = value
        return obj
    def loadblk(self, blk, buf):
        buf[:] = bytes([self.value]) * len(buf)
    def storeblk(self, blk, buf):
        raise AssertionError("nothing is written out here")

def mapped(addr):
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False

MAKERS = {
    "ndarray(buffer=vma)": lambda vma: np.ndarray((len(vma),), np.uint8, buffer=vma),
    "ndarray(buffer=memoryview(vma))": lambda vma: np.ndarray((len(vma),), np.uint8, buffer=memoryview(vma)),
    "view of a view": lambda vma: np.ndarray((len(vma),), np.uint8, buffer=vma)[PS:][::2][3:],
    "reshaped view": lambda vma: np.ndarray((len(vma),), np.uint8, buffer=vma).reshape(4, PS)[1:, ::4],
}
"""


def run(code):
    r = run_py(COMMON + textwrap.dedent(code))
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout.splitlines()


@pytest.mark.parametrize(
    "maker",
    ["ndarray(buffer=vma)", "ndarray(buffer=memoryview(vma))", "view of a view", "reshaped view"],
)
def test_arrays_outliving_close_read_zeros_never_another_file(maker):
    out = run(
        f"""
        fh = Fill(7).fileh_open()
        vma = fh.mmap(0, 4)
        a = MAKERS[{maker!r}](vma)
        print("before", int(a.max()))
        a[0] = 1                            # dirties a page of fh
        addr = vma.addr_start
        vma.close()
        fh.close()                          # the mapping is gone from fh
        other_fh = Fill(9).fileh_open()
        others = [other_fh.mmap(0, 4) for _ in range(64)]
        print("others elsewhere", all(o.addr_start != addr for o in others))
        print("others", {{int(np.frombuffer(memoryview(o), np.uint8).max()) for o in others}})
        print("after", int(a.max()), int(a.min()))
        a[:] = 3                            # goes nowhere
        print("other handle clean", other_fh.dirty_blocks())
        r = weakref.ref(vma)
        del vma, a
        gc.collect()
        print("freed", r() is None, "unmapped", not mapped(addr))
        """
    )
    assert out == [
        "before 7",
        "others elsewhere True",
        "others {9}",
        "after 0 0",
        "other handle clean []",
        "freed True unmapped True",
    ], out


def test_close_is_refused_while_a_buffer_of_the_vma_is_held():
    # np.frombuffer keeps a memoryview of the VMA: a held buffer.
    out = run(
        """
        vma = Fill(5).fileh_open().mmap(0, 2)
        a = np.frombuffer(vma, np.uint8)
        try:
            vma.close()
        except BufferError as e:
            print("refused", "exported buffer" in str(e))
        print(int(a[PS]), vma.closed)
        del a
        vma.close()
        print(vma.closed)
        """
    )
    assert out == ["refused True", "5 False", "True"]


def test_mmap_cached_mappings_stay_for_arrays_of_closed_holders():
    # The cache shares one mapping among holders: closing a holder and
    # dropping the cache unmaps it only once no array reaches it.
    out = run(
        """
        fh = Fill(4).fileh_open()
        v1 = fh.mmap_cached(0, 2)
        v2 = fh.mmap_cached(1, 1)
        print("shared", v1.addr_start == v2.addr_start)
        a = np.ndarray((2 * PS,), np.uint8, buffer=v1)
        b = np.ndarray((PS,), np.uint8, buffer=v2)
        v1.close()
        fh.release_cached()
        print("b still maps the file", int(b[0]))
        del v2, b
        gc.collect()
        print("a reads zeros", int(a.max()))
        fh.close()
        print("closed", fh.closed)
        """
    )
    assert out == ["shared True", "b still maps the file 4", "a reads zeros 0", "closed True"]


def test_unclosed_vma_kept_by_an_array_keeps_the_file():
    out = run(
        """
        fh = Fill(6).fileh_open()
        a = np.ndarray((PS,), np.uint8, buffer=fh.mmap(0, 1))
        gc.collect()
        print(int(a[0]))
        try:
            fh.close()
        except RuntimeError as e:
            print("live mapping" in str(e))
        """
    )
    assert out == ["6", "True"]
