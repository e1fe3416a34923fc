"""fork(): nothing a child does changes what its parent sees or stores; the
child's inherited mappings work (nothing resident, nothing dirty, memory of
its own, the file's data); a ZBigFile refuses to load in a child of the
process that opened its connection; a multiprocessing pool with the fork
start method reads an inherited mapping right and never hangs; a child of a
process on userfaultfd opens new handles on a userfaultfd of its own (its
own RAMs' and the default RAM's, renewed), so that `np.save` of pages not
loaded works there as in the parent."""

import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from bigfile import FORKED_WORKER_STATUS, WRITEOUT_MARKSTORED, WRITEOUT_STORE, BigFile, ram_reclaim

from bigfile.bigarray import BigArray

from conftest import PS, DataFile, uffd_ram

# Python 3.12+ warns about fork() in a process with threads (pytest and
# the pool's own threads may be there): the point here is what bigfile does.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def in_child(body):
    """Fork; the child runs `body` and exits 0 if it returned True; the
    parent gets the wait status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if body() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("how", ["close", "read", "write", "abort"])
def test_a_child_changes_nothing_of_the_parent(how):
    f = DataFile()
    fh = f.fileh_open(budget=2 * PS)
    vma = fh.mmap(0, 16)
    m = memoryview(vma)
    m[7] = 0xAA  # the parent's change, not written out
    assert m[PS] == 1

    def child():
        if how == "close":
            m.release()
            vma.close()
            fh.close()
            return True
        ok = fh.dirty_blocks() == [] and m[7] == 0 and m[PS] == 1
        if how == "read":
            ok &= all(m[b * PS + 3] == b for b in range(16))  # reclaims
        elif how == "write":
            m[PS] = 0x11
            fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
            ok &= f.data[1][0] == 0x11 and fh.dirty_blocks() == []
        elif how == "abort":
            m[2 * PS] = 0x33
            os.abort()
        return ok

    status = in_child(child)
    if how == "abort":
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGABRT
    else:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, how
    assert m[7] == 0xAA and m[PS] == 1 and m[2 * PS] == 2
    assert fh.dirty_blocks() == [0]
    fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
    assert f.data[0][7] == 0xAA and f.stores == [0]


@pytest.mark.parametrize("writeout", [False, True])
def test_a_child_forked_inside_loadblk_or_storeblk_cannot_reach_the_parents_page(writeout):
    """Found in review: the buffer of loadblk/storeblk is the RAM page
    itself, a shared mapping; a child forked inside the call wrote through
    it into its parent's page. The child's buffer is a private copy: it
    keeps what it showed, the child's writes stay the child's."""
    statuses = []

    def fork_and_scribble(buf):
        seen = bytes(buf[:4])
        status = in_child(lambda: bytes(buf[:4]) == seen and scribble(buf))
        statuses.append(status)

    def scribble(buf):
        if buf.readonly:
            # storeblk's buffer stays read-only in the child.
            try:
                buf[0] = 0xEE
            except TypeError:
                return True
            return False
        buf[:] = b"\xee" * len(buf)
        return buf[0] == 0xEE

    class F(DataFile):
        def loadblk(self, blk, buf):
            super().loadblk(blk, buf)
            buf[1:3] = b"\x5a\x5a"
            if not writeout:
                fork_and_scribble(buf)

        def storeblk(self, blk, buf):
            fork_and_scribble(buf)
            super().storeblk(blk, buf)

    f = F()
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 2))
    assert m[PS] == 1 and m[PS + 1] == 0x5A
    if writeout:
        m[PS + 3] = 0x33
        fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
        assert f.data[1][:4] == b"\x01\x5a\x5a\x33"
    [status] = statuses
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert bytes(m[PS:PS + 4]) == (b"\x01\x5a\x5a\x33" if writeout else b"\x01\x5a\x5a\x01")
    assert m[2 * PS - 1] == 1


# The pool's workers: the mapping they inherit.
_INHERITED = {}


def _block_sum(blk):
    a = _INHERITED["array"]
    return int(a[blk * PS:(blk + 1) * PS].sum())


def test_a_fork_pool_reads_an_inherited_mapping():
    f = DataFile()
    fh = f.fileh_open(budget=4 * PS)
    vma = fh.mmap(0, 64)
    a = np.ndarray((64 * PS,), np.uint8, buffer=vma)
    a[0] = 200  # the parent's change: not the workers'
    _INHERITED["array"] = a
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(3) as pool:
            sums = pool.map_async(_block_sum, range(64), chunksize=4).get(timeout=120)
    finally:
        del _INHERITED["array"]
    assert sums == [b * PS for b in range(64)]
    assert a[0] == 200 and fh.dirty_blocks() == [0]
    assert int(a[PS:2 * PS].sum()) == PS


SAVED_BLOCKS = 16


def _save_a_new_handle(out, ram_of_parent, inherited_default):
    """In a forked child: the RAM inherited from the parent is on signals,
    saying why; a handle opened here (on a RAM of the child's own, or on
    the default RAM, when given the parent's handle on it) is on a
    userfaultfd of the child's: `np.save` of its pages not loaded works.
    The inherited handle's pages, on the default RAM the new one replaced,
    are reclaimed with the new one's by `ram_reclaim()`. (An AssertionError
    is exit code 1.)"""
    assert ram_of_parent.fault_backend == "signals"
    assert "forked child" in ram_of_parent.fault_backend_fallback
    default = inherited_default is not None
    fh = DataFile().fileh_open(**({} if default else {"ram": uffd_ram(budget=4 * PS)}))
    assert fh.ram_stats()["fault_backend"] == "userfaultfd"
    np.save(out, BigArray((SAVED_BLOCKS * PS // 8,), np.uint64, fh)[:])
    if default:
        m = memoryview(inherited_default.mmap(0, 4))
        assert [m[b * PS] for b in range(4)] == [0, 1, 2, 3]
        assert inherited_default.ram_stats()["fault_backend"] == "signals"
        held = [h.ram_stats()["resident_bytes"] for h in (inherited_default, fh)]
        assert all(held)
        assert ram_reclaim() * PS >= sum(held)
        assert [h.ram_stats()["resident_bytes"] for h in (inherited_default, fh)] == [0, 0]


def _saved_right(path):
    want = np.repeat(np.arange(SAVED_BLOCKS, dtype=np.uint8), PS).view(np.uint64)
    return np.array_equal(np.load(path), want)


@pytest.mark.parametrize("ram", ["own", "default"])
def test_a_fork_child_of_a_userfaultfd_process_saves_pages_not_loaded(tmp_path, ram):
    parent_ram = uffd_ram(budget=4 * PS)
    fh = DataFile().fileh_open(ram=parent_ram)
    a = BigArray((SAVED_BLOCKS * PS // 8,), np.uint64, fh)
    np.save(tmp_path / "parent.npy", a[:])  # the service runs when it forks
    on_default = DataFile().fileh_open()
    if ram == "default" and on_default.ram_stats()["fault_backend"] != "userfaultfd":
        pytest.skip("the default RAM is on signals here (BIGFILE_FAULTS): nothing to renew")
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(
        target=_save_a_new_handle,
        args=(tmp_path / "child.npy", parent_ram, on_default if ram == "default" else None),
    )
    child.start()
    child.join(120)
    assert child.exitcode == 0
    assert _saved_right(tmp_path / "child.npy")
    # The parent goes on on its userfaultfd: its pages taken away, saved
    # again from pages not loaded.
    assert parent_ram.fault_backend == "userfaultfd"
    parent_ram.reclaim()
    np.save(tmp_path / "parent.npy", a[:])
    assert _saved_right(tmp_path / "parent.npy")


def test_a_zbigfile_refuses_to_load_in_a_forked_child(tmp_path):
    import transaction
    import ZODB
    from ZODB.FileStorage import FileStorage

    from bigfile.file_zodb import ZBigFile

    db = ZODB.DB(FileStorage(str(tmp_path / "data.fs")))
    try:
        conn = db.open()
        root = conn.root()
        root["f"] = zf = ZBigFile(PS)
        transaction.commit()
        fh = zf.fileh_open()
        vma = fh.mmap(0, 4)
        assert memoryview(vma)[0] == 0

        def child():
            # One attempt: the refusal is the answer, not worth retrying.
            fh._zfileh.set_load_policy(1)
            try:
                vma.prefault(PS, 2 * PS)
            except RuntimeError as e:
                return "forked child" in str(e) and "spawn" in str(e)
            return False

        status = in_child(child)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        vma.prefault(PS, 2 * PS)  # the parent goes on
        del vma
        fh.close()
        transaction.abort()
        conn.close()
    finally:
        db.close()


class ForksOnAWorker(BigFile):
    """Block b all bytes b. The first loadblk (or storeblk, `on_store`) run
    on a thread other than the main one (one of bigfile's workers) forks;
    the child sends its stderr to `err` and returns from the call, into the
    worker it is a copy of. Takes no lock: the child must get back there."""

    def __new__(cls, err, on_store=False):
        obj = BigFile.__new__(cls, PS)
        obj.err, obj.on_store, obj.child = err, on_store, 0
        return obj

    def _fork_on_a_worker(self):
        if threading.current_thread() is threading.main_thread() or self.child:
            return
        pid = os.fork()
        if pid == 0:
            os.dup2(self.err.fileno(), 2)
        else:
            self.child = pid

    def loadblk(self, blk, buf):
        if not self.on_store:
            self._fork_on_a_worker()
        buf[:] = bytes([blk & 0xFF]) * len(buf)

    def storeblk(self, blk, buf):
        if self.on_store:
            self._fork_on_a_worker()


class ForksAhead(ForksOnAWorker):
    readahead = True


def _check_forked_on_a_worker(f, call, timeout=60):
    """The child `f`'s call forked on a worker ended at once, with the
    documented status, after saying why (a hang is killed and fails)."""
    deadline = time.monotonic() + timeout
    while not f.child:
        assert time.monotonic() < deadline, "never forked on a worker"
        time.sleep(0.001)
    while True:
        pid, status = os.waitpid(f.child, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.kill(f.child, signal.SIGKILL)
            os.waitpid(f.child, 0)
            f.err.seek(0)
            pytest.fail("the child forked on a worker hung; stderr:\n" + f.err.read())
        time.sleep(0.005)
    f.err.seek(0)
    said = f.err.read()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == FORKED_WORKER_STATUS, (status, said)
    assert f"bigfile: a {call} of block" in said and "forked on bigfile's worker thread" in said, said


def test_a_loadblk_forking_on_a_userfaultfd_worker_ends_the_child(tmp_path):
    """Found in review: the child went back into its parent's worker loop
    (ran the parent's queued faults against its own state, then exited 0
    as if nothing happened). A system call's fault is loaded on a worker;
    its loadblk forks; the child ends as the call returns; the parent's
    call copies the right data."""
    with open(tmp_path / "err", "w+") as err:
        f = ForksOnAWorker(err)
        fh = f.fileh_open(ram=uffd_ram(budget=8 * PS))
        vma = fh.mmap(0, 8)
        out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
        try:
            assert os.write(out, memoryview(vma)) == 8 * PS
            _check_forked_on_a_worker(f, "loadblk")
            assert os.pread(out, 8 * PS, 0) == b"".join(bytes([b]) * PS for b in range(8))
        finally:
            os.close(out)


@pytest.mark.parametrize("call", ["loadblk", "storeblk"])
def test_a_call_forking_on_a_read_ahead_worker_ends_the_child(tmp_path, call):
    """Found in review: the child went back into its parent's worker loop
    (its parent's queued jobs run against its own state: a panic; or a wait
    for jobs for ever). A loader read ahead forks on the worker (or writes
    out another handle, whose storeblk forks); the child ends as the call
    returns; the parent's pages load."""
    with open(tmp_path / "err", "w+") as err:
        below = ForksOnAWorker(err, on_store=True)
        below_fh = below.fileh_open(ram="memfd")
        memoryview(below_fh.mmap(0, 1))[0] = 0x77

        class Layered(BigFile):
            """Read ahead; writes `below` out first, on a worker."""

            readahead = True

            def loadblk(self, blk, buf):
                if threading.current_thread() is not threading.main_thread():
                    below_fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
                buf[:] = bytes([blk & 0xFF]) * len(buf)

        f = ForksAhead(err) if call == "loadblk" else Layered(PS)
        fh = f.fileh_open(ram="memfd", budget=32 * PS)
        vma = fh.mmap(0, 16)
        vma.advise("sequential")
        m = memoryview(vma)
        assert m[0] == 0  # the rest of the window is read ahead, on workers
        _check_forked_on_a_worker(below if call == "storeblk" else f, call)
        assert all(m[b * PS + 5] == b for b in range(16))
        assert below_fh.dirty_blocks() == [] or call == "loadblk"
