"""Subinterpreters in the process: faults decide from the faulting thread's
own state whether it holds a GIL, never abort. bigfile itself lives in the
main interpreter (pyo3 modules refuse to be imported in a subinterpreter);
a subinterpreter's code reaches a mapping only through its address.
Each in a fresh interpreter (the failure being fixed was an abort)."""

import signal
import sys
import textwrap

import pytest
from conftest import run_py

COMMON = """
import ctypes, mmap, os, sys, tempfile, threading
import numpy as np
try:
    import _interpreters as interpreters          # 3.13+
except ImportError:
    import _xxsubinterpreters as interpreters     # 3.9-3.12
from bigfile import BigFile, _bigfile
from bigfile.file_file import BigFile_File
PS = mmap.PAGESIZE

class Data(BigFile):
    def loadblk(self, blk, buf):
        buf[:] = bytes([blk]) * len(buf)

def native(nblocks):
    fd, path = tempfile.mkstemp()
    os.write(fd, b"".join(bytes([b]) * PS for b in range(nblocks)))
    os.close(fd)
    f = BigFile_File(path, PS)
    os.unlink(path)
    return f

def new_interpreter():
    # ctypes and threads work in an isolated subinterpreter (own GIL) from
    # 3.13 on; before, a legacy one (sharing the main GIL) is needed.
    if sys.version_info < (3, 13):
        return interpreters.create(isolated=False)
    return interpreters.create()
"""


def run(code):
    r = run_py(COMMON + textwrap.dedent(code))
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout.split()


def test_faults_without_the_gil_after_a_subinterpreter_came_and_went():
    out = run(
        """
        interpreters.destroy(interpreters.create())
        for f in (Data(PS), native(8)):
            vma = f.fileh_open().mmap(0, 8)
            a = np.ndarray((8 * PS,), np.uint8, buffer=vma)
            print(_bigfile._read_nogil(vma, 3 * PS),         # GIL released by us
                  int(a.sum(dtype=np.uint64)) // PS,         # by numpy
                  _bigfile._read_in_new_thread(vma, 5 * PS), # a thread Python never saw
                  a[7 * PS])                                 # holding the GIL
        """
    )
    assert out == ["3", "28", "5", "7"] * 2


def test_subinterpreter_code_reading_a_native_mapping():
    out = run(
        """
        fh = native(4).fileh_open()
        vma = fh.mmap(0, 4)
        i = new_interpreter()
        interpreters.run_string(i, f"import ctypes; assert ctypes.string_at({vma.addr_start} + 2 * {PS}, 3) == bytes([2]) * 3")
        interpreters.destroy(i)
        print(fh.stats()["loads"], memoryview(vma)[2 * PS])
        """
    )
    assert out == ["1", "2"]


@pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason="before 3.12 CPython keeps no per-thread current thread state: a thread "
    "running a subinterpreter's code cannot be told to hold the GIL (README)",
)
def test_subinterpreter_code_reading_a_mapping_of_a_python_loader():
    # The thread holds the subinterpreter's GIL; the loader runs in the main
    # interpreter; then the thread goes on in the subinterpreter.
    out = run(
        """
        fh = Data(PS).fileh_open()
        vma = fh.mmap(0, 4)
        i = new_interpreter()
        interpreters.run_string(i, f"import ctypes; assert ctypes.string_at({vma.addr_start} + 3 * {PS}, 2) == bytes([3]) * 2")
        interpreters.destroy(i)
        print(fh.stats()["loads"])
        """
    )
    assert out == ["1"]


def test_thread_started_by_a_subinterpreter_reading_a_mapping_of_a_python_loader():
    # Its thread state belongs to the subinterpreter. From 3.12 the loader
    # runs in a thread state of the main interpreter made for it; before,
    # the PyGILState API cannot give it one: not a hang, not an abort, but
    # SIGBUS saying so.
    thread_code = textwrap.dedent(
        """
        import ctypes, threading
        t = threading.Thread(target=lambda: print(ctypes.string_at(ADDR + 2 * PS, 1)[0], flush=True))
        t.start()
        t.join()
        """
    )
    r = run_py(
        COMMON
        + textwrap.dedent(
            f"""
            fh = Data(PS).fileh_open()
            vma = fh.mmap(0, 4)
            i = new_interpreter()
            interpreters.run_string(
                i, {thread_code!r}.replace("ADDR", str(vma.addr_start)).replace("PS", str(PS))
            )
            print("loads", fh.stats()["loads"])
            """
        )
    )
    if sys.version_info >= (3, 12):
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        assert r.stdout.split() == ["2", "loads", "1"]
    else:
        assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)
        assert "thread started by a subinterpreter" in r.stderr, r.stderr
        assert "loads" not in r.stdout
