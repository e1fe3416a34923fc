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
