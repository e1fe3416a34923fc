"""Read-ahead of a Python loader that opts in (`BigFile.readahead = True`):
its `loadblk` runs on a read-ahead worker (holding the GIL) ahead of a
sequential scan; a failing read-ahead load is forgotten (the block is loaded
again when touched, and only that load's failure is reported, as without
read-ahead); a thread holding the GIL that touches a page being read ahead
does not deadlock with the worker; a forked child reads ahead with workers
of its own. A loader that does not opt in is never read ahead."""

import textwrap
import threading
import time

import numpy as np
import pytest

from bigfile import BigFile

from conftest import PS, run_py

BLK = 16 * PS
NBLK = 64


class Scanned(BigFile):
    """Block b holds the u64 b + 1 everywhere; records which threads loaded
    which blocks; fails the blocks in `fail` (on read-ahead workers only
    when `only_ahead`)."""

    readahead = True

    def __new__(cls, fail=(), only_ahead=False):
        obj = BigFile.__new__(cls, BLK)
        obj.fail, obj.only_ahead = set(fail), only_ahead
        obj.loads = []
        return obj

    def loadblk(self, blk, buf):
        on_main = threading.current_thread() is threading.main_thread()
        self.loads.append((blk, on_main))
        if blk in self.fail and not (self.only_ahead and on_main):
            raise ZeroDivisionError(f"no block {blk}")
        np.ndarray((BLK // 8,), np.uint64, buffer=buf).fill(blk + 1)


# What the child processes below start with: a file whose block b holds
# the u64 b + 1 everywhere and whose loads take DELAY seconds (the GIL
# released meanwhile, as a storage's read would), and a scan of blocks.
CHILD = """
import os, sys, threading, time
import numpy as np
from bigfile import BigFile
BLK = 65536
class Slow(BigFile):
    readahead = True
    def loadblk(self, blk, buf):
        time.sleep(DELAY)
        np.ndarray((BLK // 8,), np.uint64, buffer=buf).fill(blk + 1)
def scanned(words, blocks, fh=None):
    ok = True
    for i, b in enumerate(blocks):
        ok &= bool(words[b * BLK // 8] == b + 1)
        if fh is not None and i == 3:
            # A touch takes over the jobs no worker has begun: let a worker
            # load (the test is about the workers' loads).
            deadline = time.monotonic() + 30
            while fh.stats()["readahead_loads"] == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
    return ok
"""


def run_child(body, timeout=60):
    """Run CHILD then `body` in a fresh interpreter (fork's warning about
    threads ignored: the point is what bigfile does)."""
    return run_py(CHILD + textwrap.dedent(body), "-W", "ignore::DeprecationWarning", timeout=timeout)


class NotAhead(Scanned):
    readahead = False


def scan(f, attempts=3):
    """Touch the first word of every block (the GIL held, as Python code
    touches memory), each load given `attempts`; return the handle's stats."""
    with f.fileh_open(ram="memfd", budget=32 * BLK) as fh, fh.mmap(0, NBLK) as vma:
        fh.set_load_policy(attempts)
        words = np.ndarray((NBLK * BLK // 8,), np.uint64, buffer=vma)
        for b in range(NBLK):
            assert words[b * BLK // 8] == b + 1
            if b == 3 and f.readahead:
                # A touch takes over the jobs no worker has begun: let a
                # worker begin one (the tests are about the workers' loads).
                deadline = time.monotonic() + 30
                while all(on_main for _, on_main in f.loads):
                    assert time.monotonic() < deadline, f.loads
                    time.sleep(0.001)
        del words
        return fh.stats()


def test_the_base_class_and_zbigfile_do_not_read_ahead():
    assert BigFile.readahead is False and Scanned.readahead is True
    # A ZBigFile's loads use its ZODB connection, which the application's
    # thread uses meanwhile.
    file_zodb = pytest.importorskip("bigfile.file_zodb")
    assert file_zodb._ZBigFile.readahead is False


def test_an_opted_in_loader_is_read_ahead_on_a_worker():
    f = Scanned()
    st = scan(f)
    assert st["readahead_loads"] > 0 and st["readahead_hits"] > 0, st
    # (A load is listed when it starts, counted when it ends: the handle's
    # close waited for those still running when the stats were taken.)
    ahead = [blk for blk, on_main in f.loads if not on_main]
    assert len(ahead) >= st["readahead_loads"], (f.loads, st)
    assert {blk for blk, _ in f.loads} == set(range(NBLK)), f.loads


def test_a_loader_that_does_not_opt_in_is_not_read_ahead():
    f = NotAhead()
    st = scan(f)
    assert st["streams"] == 1 and st["readahead_loads"] == 0, st
    assert all(on_main for _, on_main in f.loads)


def test_a_failing_read_ahead_is_forgotten(capfd):
    """Every read-ahead load fails: each such block is loaded again by the
    touch (on the main thread), which succeeds; nothing is reported."""
    f = Scanned(fail=range(NBLK), only_ahead=True)
    st = scan(f, attempts=1)
    failed = {blk for blk, on_main in f.loads if not on_main}
    again = {blk for blk, on_main in f.loads if on_main}
    assert failed and failed <= again, f.loads
    assert st["readahead_loads"] == 0 and st["loads"] == NBLK, st
    err = capfd.readouterr().err
    assert "ZeroDivisionError" not in err and "no block" not in err, err


def test_the_touch_of_a_block_whose_read_ahead_failed_raises_as_without():
    f = Scanned(fail={20})
    with f.fileh_open(ram="memfd", budget=32 * BLK) as fh, fh.mmap(0, NBLK) as vma:
        fh.set_load_policy(1)
        words = np.ndarray((NBLK * BLK // 8,), np.uint64, buffer=vma)
        for b in range(20):
            assert words[b * BLK // 8] == b + 1
        del words
        # Block 20 is in the window read ahead of block 19: wait for its
        # load on the worker to have been tried (it runs asynchronously).
        deadline = time.monotonic() + 30
        while not any(blk == 20 and not on_main for blk, on_main in f.loads):
            assert time.monotonic() < deadline, f.loads
            time.sleep(0.01)
        with pytest.raises(ZeroDivisionError, match="no block 20"):
            vma.prefault(20 * BLK, 21 * BLK)


def test_a_thread_holding_the_gil_waits_for_a_read_ahead_without_deadlock():
    """The worker needs the GIL to run loadblk; the scanning thread holds it
    when it touches a page still loading ahead (loads are slow here), and
    another thread keeps asking for it: the wait releases it. In a child,
    which a deadlock would leave hanging until the timeout."""
    r = run_child(
        """
        DELAY = 0.002
        stop = False
        def spin():
            n = 0
            while not stop:
                n += 1
        t = threading.Thread(target=spin)
        t.start()
        with Slow(BLK).fileh_open(ram="memfd", budget=32 * BLK) as fh, fh.mmap(0, 64) as vma:
            words = np.ndarray((64 * BLK // 8,), np.uint64, buffer=vma)
            ok = scanned(words, range(64), fh)
            del words
            st = fh.stats()
        stop = True
        t.join()
        print(ok, st["readahead_loads"] > 0, st["readahead_hits"] > 0)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True", "True"], (r.stdout, r.stderr[-2000:])


def test_a_forked_child_reads_ahead_with_workers_of_its_own():
    r = run_child(
        """
        DELAY = 0
        def scan():
            with Slow(BLK).fileh_open(ram="memfd", budget=32 * BLK) as fh, fh.mmap(0, 64) as vma:
                words = np.ndarray((64 * BLK // 8,), np.uint64, buffer=vma)
                ok = scanned(words, range(64), fh)
                del words
                return ok and fh.stats()["readahead_loads"] > 0
        assert scan()  # the parent's workers started
        pid = os.fork()
        if pid == 0:
            os._exit(0 if scan() else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), scan())
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "True"], (r.stdout, r.stderr[-2000:])


def test_the_interpreter_exits_while_loads_are_read_ahead():
    """A worker whose loadblk released the GIL (a sleep) would be ended by
    Python's finalization when it takes the GIL again, aborting the process:
    exiting waits for the loads in progress and refuses further ones. Also
    in a forked child, whose parent's loads in progress are not its own."""
    r = run_child(
        """
        DELAY = 0.005
        fh = Slow(BLK).fileh_open(ram="memfd", budget=64 * BLK)
        vma = fh.mmap(0, 256)
        words = np.ndarray((256 * BLK // 8,), np.uint64, buffer=vma)
        assert scanned(words, range(10))
        if os.fork() == 0:
            # Exits with loads of its own read ahead in progress.
            assert scanned(words, range(10, 20))
            sys.exit(0)
        _, status = os.wait()
        assert scanned(words, range(20, 30))
        print("child", os.waitstatus_to_exitcode(status), fh.stats()["readahead_loads"] > 0, flush=True)
        # Exits with loads read ahead in progress.
        """
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == ["child", "0", "True"], (r.stdout, r.stderr[-2000:])
