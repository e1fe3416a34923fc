"""Python's faulthandler before or after import: page faults still served,
real crashes still reported. Each case in a fresh interpreter."""

import signal

import pytest
from conftest import run_py

SETUP = """
import mmap, sys
from bigfile import BigFile
PS = mmap.PAGESIZE
class F(BigFile):
    def loadblk(self, blk, buf):
        buf[:] = bytes([blk + 1]) * len(buf)
fh = F(PS).fileh_open()
"""

CRASH = """
import ctypes
print("crashing", flush=True)
ctypes.string_at(0)
"""


def check_ok(r, want):
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == want, r.stdout
    assert "Fatal Python error" not in r.stderr


def test_enabled_before_import_x_faulthandler():
    r = run_py(SETUP + "m = memoryview(fh.mmap(0, 3)); print(m[0], m[2 * PS])", "-X", "faulthandler")
    check_ok(r, ["1", "3"])


def test_enabled_before_import_explicitly():
    code = "import faulthandler; faulthandler.enable()\n" + SETUP + "print(memoryview(fh.mmap(0, 1))[0])"
    check_ok(run_py(code), ["1"])


def test_enabled_after_mappings_exist():
    code = SETUP + """
m = memoryview(fh.mmap(0, 4))
print(m[0])
import faulthandler
faulthandler.enable()
print(m[PS], m[3 * PS])
"""
    check_ok(run_py(code), ["1", "2", "4"])


def test_enabled_through_a_saved_reference():
    # `from faulthandler import enable` taken before bigfile was imported
    # bypasses the wrapper; taking a buffer of a VMA (as numpy and
    # memoryview do) puts bigfile's handler back on top.
    code = "from faulthandler import enable\n" + SETUP + """
vma = fh.mmap(0, 2)
enable()
m = memoryview(vma)
print(m[0], m[PS])
"""
    check_ok(run_py(code), ["1", "2"])


def test_disable_after_enable():
    code = "import faulthandler; faulthandler.enable()\n" + SETUP + """
m = memoryview(fh.mmap(0, 2))
faulthandler.disable()
print(m[0])
faulthandler.enable()
faulthandler.disable()
print(m[PS])
"""
    check_ok(run_py(code), ["1", "2"])


@pytest.mark.parametrize("when", ["before", "after"])
def test_real_crash_still_reported(when):
    if when == "before":
        code = "import faulthandler; faulthandler.enable()\n" + SETUP
    else:
        code = SETUP + "import faulthandler; faulthandler.enable()\n"
    code += "print(memoryview(fh.mmap(0, 1))[0], flush=True)\n" + CRASH
    r = run_py(code)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)
    assert r.stdout.split() == ["1", "crashing"]
    assert "Fatal Python error: Segmentation fault" in r.stderr
    assert "string_at" in r.stderr or "ctypes" in r.stderr


def test_real_crash_without_faulthandler_dies_by_sigsegv():
    r = run_py(SETUP + "print(memoryview(fh.mmap(0, 1))[0], flush=True)\n" + CRASH)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)
    assert "Fatal Python error" not in r.stderr
