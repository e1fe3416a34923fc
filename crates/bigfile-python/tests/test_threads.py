"""Faults from threads: holding the GIL, without it, unknown to Python."""

import hashlib
import threading
import time

import numpy as np
from conftest import PS, DataFile, run_py

from bigfile import _bigfile


def test_faults_from_many_python_threads():
    f = DataFile()
    m = memoryview(f.fileh_open().mmap(0, 32))
    out = {}

    def worker(i):
        out[i] = [m[b * PS + i] for b in range(32)]

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(v == list(range(32)) for v in out.values())
    assert sorted(f.loads) == list(range(32)), "each block loaded once"


def test_fault_from_code_that_released_the_gil():
    f = DataFile()
    vma = f.fileh_open().mmap(0, 4)
    assert _bigfile._read_nogil(vma, 3 * PS) == 3
    # hashlib releases the GIL for large buffers; numpy for large reductions.
    assert hashlib.sha256(memoryview(vma)[: 2 * PS]).digest() == hashlib.sha256(bytes(PS) + b"\x01" * PS).digest()
    a = np.ndarray((4 * PS,), np.uint8, buffer=vma)
    assert int(a.sum(dtype=np.uint64)) == PS * (0 + 1 + 2 + 3)


def test_fault_from_thread_python_never_saw():
    f = DataFile()
    vma = f.fileh_open().mmap(0, 2)
    assert _bigfile._read_in_new_thread(vma, PS + 5) == 1
    assert f.loads == [1]


def test_exception_state_of_unknown_thread_loadblk():
    class G(DataFile):
        def loadblk(self, blk, buf):
            try:
                raise KeyError("left handled")
            except KeyError:
                pass
            DataFile.loadblk(self, blk, buf)

    vma = G().fileh_open().mmap(0, 1)
    for _ in range(3):
        assert _bigfile._read_in_new_thread(vma, 0) == 0


def test_same_block_from_two_threads_loads_once():
    started = threading.Event()
    release = threading.Event()

    class Slow(DataFile):
        def loadblk(self, blk, buf):
            started.set()
            release.wait(10)
            DataFile.loadblk(self, blk, buf)

    f = Slow()
    m = memoryview(f.fileh_open().mmap(0, 1))
    res = []

    def reader():
        res.append(m[7])

    t1 = threading.Thread(target=reader)
    t1.start()
    assert started.wait(10)
    t2 = threading.Thread(target=reader)
    t2.start()
    time.sleep(0.1)  # t2 waits for t1's load, with the GIL released
    assert t2.is_alive()
    release.set()
    t1.join(10)
    t2.join(10)
    assert res == [0, 0]
    assert f.loads == [0]


def test_two_blocks_load_concurrently():
    barrier = threading.Barrier(2, timeout=10)

    class Meet(DataFile):
        def loadblk(self, blk, buf):
            barrier.wait()  # fails unless both loadblks run at once
            DataFile.loadblk(self, blk, buf)

    f = Meet()
    m = memoryview(f.fileh_open().mmap(0, 2))
    res = {}

    def reader(b):
        res[b] = m[b * PS]

    ts = [threading.Thread(target=reader, args=(b,)) for b in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert res == {0: 0, 1: 1}
    assert sorted(f.loads) == [0, 1]


def test_load_versus_invalidate_with_python_lock():
    pylock = threading.Lock()
    loading = threading.Event()

    class G(DataFile):
        def loadblk(self, blk, buf):
            loading.set()
            with pylock:
                DataFile.loadblk(self, blk, buf)

    f = G()
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 1))
    res = []
    with pylock:
        t = threading.Thread(target=lambda: res.append(m[0]))
        t.start()
        assert loading.wait(10)
        f.data[0] = b"\x05" * PS
        fh.invalidate_page(0)  # page is loading: its load is dropped
    t.join(10)
    assert not t.is_alive()
    assert res == [5], "the invalidated load is redone with the new data"
    assert f.loads == [0, 0]


def test_writeout_with_faults_in_other_threads():
    f = DataFile()
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 16))
    for b in range(8):
        m[b * PS] = 100 + b
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            for b in range(8, 16):
                assert m[b * PS] == b

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(5):
        fh.dirty_writeout(1)
    stop.set()
    t.join(10)
    assert f.data[3][0] == 103


def test_waiters_of_a_failed_load_get_its_exception():
    """The exception a loadblk raised reaches the thread that called for the
    block and every thread that waited for that load, as the same object."""
    calls = []
    tids = {}

    def asleep(tid):
        # State S in /proc/self/task/TID/stat: "TID (COMM) S ...".
        with open("/proc/self/task/%d/stat" % tid) as f:
            return f.read().rpartition(") ")[2].startswith("S")

    class G(_bigfile.BigFile):
        def loadblk(self, blk, buf):
            calls.append(blk)
            # Fail only once the other thread has come for the block too:
            # its fault counted (as serving begins), then asleep in the
            # kernel with the GIL released, which from there is only the
            # wait for this load. A fixed pause let a thread delayed past it
            # (a loaded machine) load the block itself.
            other = [t for t in tids.values() if t != threading.get_native_id()]
            while fh.stats()["faults"] < 2 or len(other) != 1 or not asleep(other[0]):
                time.sleep(0.001)
                other = [t for t in tids.values() if t != threading.get_native_id()]
            raise KeyError("bad sector %d" % blk)

    fh = G(PS).fileh_open()
    fh.set_load_policy(1)
    vma = fh.mmap(0, 1)
    raised = {}

    def prefault(who):
        tids[who] = threading.get_native_id()
        try:
            vma.prefault(0, PS)
        except KeyError as e:
            raised[who] = e

    ts = [threading.Thread(target=prefault, args=(who,)) for who in ("a", "b")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert calls == [0], "one load, the other thread waited for it"
    assert raised["a"] is raised["b"]
    assert raised["a"].args == ("bad sector 0",)
    assert fh.page_state(0) is None


BYTEARRAY_RACE = """
import mmap, os, tempfile, threading
from bigfile.file_file import BigFile_File
PS = mmap.PAGESIZE
N = 64
fd, path = tempfile.mkstemp()
os.write(fd, b"".join(bytes([b % 251 + 1]) * PS for b in range(N)))
os.close(fd)
fh = BigFile_File(path, PS).fileh_open(ram="memfd", budget=4 * PS)
os.unlink(path)
mv = memoryview(fh.mmap(0, N))
holder = [bytearray()]
stop = False
def dropper():
    while not stop:
        holder[0].clear()
        holder[0] = bytearray()
def reader():
    while not stop:
        for k in range(0, N * PS, PS):
            mv[k]
ts = [threading.Thread(target=dropper), threading.Thread(target=reader)]
for t in ts:
    t.start()
for i in range(20000):
    off = (i * 7 % (N - 1)) * PS
    b = holder[0]
    # bytearray's += resizes, then copies from the mapping (faults): no other
    # thread may run in between, or the buffer it copies into is freed.
    b += mv[off:off + 2 * PS]
stop = True
for t in ts:
    t.join()
print("faults", fh.stats()["faults"])
"""


def test_c_code_faulting_with_the_gil_sees_no_other_thread_run():
    r = run_py(BYTEARRAY_RACE)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert int(r.stdout.split()[1]) > 20000, "every copy faulted"


def test_faults_holding_the_gil_wait_for_a_python_load_without_deadlock():
    # Python loads need the GIL: a thread holding it that must wait for one
    # (the same block, or room in a budget the loads hold) releases it.
    r = run_py(
        """
        import mmap, threading, time
        from bigfile import BigFile
        PS = mmap.PAGESIZE
        class Slow(BigFile):
            def loadblk(self, blk, buf):
                time.sleep(0.01)            # lets the other threads run
                buf[:] = bytes([blk]) * len(buf)
        for budget in (1, 2, 8):
            m = memoryview(Slow(PS).fileh_open(ram="memfd", budget=budget * PS).mmap(0, 8))
            out = {}
            def reader(i):
                out[i] = [m[((b + i) % 8) * PS] for b in range(16)]
            ts = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert out == {i: [(b + i) % 8 for b in range(16)] for i in range(4)}, out
        print("ok")
        """,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.split() == ["ok"], (r.returncode, r.stderr)
