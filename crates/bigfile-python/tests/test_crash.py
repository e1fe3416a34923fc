"""Crash-type behaviour, each in a fresh interpreter."""

import signal

from conftest import run_py

RAISING = """
import mmap, sys
from bigfile import BigFile
PS = mmap.PAGESIZE
class Broken(BigFile):
    def loadblk(self, blk, buf):
        self.calls = getattr(self, "calls", 0) + 1
        raise ValueError("cannot load block %d, attempt %d" % (blk, self.calls))
fh = Broken(PS).fileh_open()
fh.set_load_policy(2, 0.0)
m = memoryview(fh.mmap(3, 1))
print("touching", flush=True)
m[0]
print("not reached", flush=True)
"""


def test_loadblk_raising_prints_traceback_then_sigbus():
    r = run_py(RAISING)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr)
    assert r.stdout.split() == ["touching"]
    err = r.stderr
    assert "Traceback (most recent call last)" in err
    assert "ValueError: cannot load block 3, attempt 1" in err
    assert "ValueError: cannot load block 3, attempt 2" in err, "retried per the load policy"
    assert "Broken" in err and "block 3" in err


def test_loadblk_raising_under_faulthandler():
    r = run_py(RAISING, "-X", "faulthandler")
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr)
    assert "ValueError: cannot load block 3" in r.stderr


def test_loadblk_touching_its_own_page_is_fatal():
    code = """
import mmap
from bigfile import BigFile
PS = mmap.PAGESIZE
class Selfish(BigFile):
    def loadblk(self, blk, buf):
        buf[:] = m[0:PS]
m = memoryview(Selfish(PS).fileh_open().mmap(0, 1))
m[0]
"""
    r = run_py(code)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)
    assert "own page" in r.stderr


def test_storeblk_writing_its_page_is_fatal_not_a_hang():
    code = """
import mmap
from bigfile import BigFile
PS = mmap.PAGESIZE
class W(BigFile):
    def loadblk(self, blk, buf):
        pass
    def storeblk(self, blk, buf):
        m[0] = 2
fh = W(PS).fileh_open()
m = memoryview(fh.mmap(0, 1))
m[0] = 1
fh.dirty_writeout(1)
"""
    r = run_py(code, timeout=60)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)
    assert "writeout" in r.stderr


def test_exit_with_live_mappings_dirty_pages_and_cycles():
    code = """
import mmap, threading
import numpy as np
from bigfile import BigFile
PS = mmap.PAGESIZE
class F(BigFile):
    def loadblk(self, blk, buf):
        buf[:] = bytes([blk]) * len(buf)
    def storeblk(self, blk, buf):
        pass
f = F(PS)
f.fh = f.fileh_open()
f.vma = f.fh.mmap(0, 8)
a = np.ndarray((8 * PS,), np.uint8, buffer=f.vma)
a[::PS] = 9
def reader():
    while True:
        a[::PS].sum()
threading.Thread(target=reader, daemon=True).start()
print("exiting", flush=True)
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["exiting"]


def test_del_raising_during_cleanup_gc_is_reported_not_fatal():
    code = """
import gc, mmap, sys
from bigfile import BigFile
PS = mmap.PAGESIZE
class Bomb:
    def __del__(self):
        raise ZeroDivisionError("raised in __del__")
class F(BigFile):
    def loadblk(self, blk, buf):
        b = Bomb()
        b.cycle = b
        b.buf = buf
        buf[:] = bytes([blk]) * len(buf)
m = memoryview(F(PS).fileh_open().mmap(0, 3))
try:
    raise KeyError("outer")
except KeyError as e:
    print(m[0], m[PS], m[2 * PS], sys.exc_info()[1] is e, flush=True)
print(sys.exc_info()[0])
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "1", "2", "True", "None"]
    assert "ZeroDivisionError: raised in __del__" in r.stderr


def test_retried_load_errors_are_freed_holding_the_gil():
    # A load that failed and was retried leaves its exception to be freed
    # inside virtmem, with the GIL released (prefault) or never held (a
    # thread Python never saw): freeing it must take the GIL.
    code = """
import mmap, gc
from bigfile import BigFile, _bigfile
PS = mmap.PAGESIZE
class Flaky(BigFile):
    def loadblk(self, blk, buf):
        self.n = getattr(self, "n", 0) + 1
        if self.n % 2:
            raise ValueError("flaky " + "x" * 1000)   # a fresh object to free
        buf[:] = bytes([blk]) * len(buf)
fh = Flaky(PS).fileh_open()
fh.set_load_policy(2, 0.0)
vma = fh.mmap(0, 64)
for blk in range(0, 64, 2):
    vma.prefault(blk * PS, blk * PS + 1)
    assert _bigfile._read_in_new_thread(vma, (blk + 1) * PS) == blk + 1
gc.collect()
print("ok", fh.stats()["load_errors"])
"""
    r = run_py(code)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == ["ok", "64"]
