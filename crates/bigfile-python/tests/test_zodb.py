"""ZBigFile and ZBigArray on ZODB: on a FileStorage, through a real ZEO
server, and on RelStorage over a real PostgreSQL server (history-preserving
and history-free); the servers are started on 127.0.0.1 by conftest.py."""

import json
import mmap
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import transaction
import ZODB
from BTrees.LOBTree import LOBTree
from ZODB.POSException import ConflictError

from bigfile.bigarray.array_zodb import ZBigArray
from bigfile import file_zodb
from bigfile.file_zodb import ZBigFile, ZBigFileH, ZBlk0, ZBlk1
from bigfile.uri import open_db

PS = mmap.PAGESIZE
BLK = 64 << 10  # small blocks: several per test array, 16 ZBlk1 chunks each
HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "zodb_worker.py")
REPLY_TIMEOUT = 180


# ~~~ storages


class Store:
    """Where a test's database is: a URI (``bigfile.uri``) that this
    process and worker processes open; `activity()` describes what its
    server is doing (for a test that waited too long)."""

    def __init__(self, kind, uri, server=None):
        self.kind, self.uri, self.server = kind, uri, server

    def activity(self):
        describe = getattr(self.server, "activity", None)
        return describe() if describe is not None else ""

    def db(self):
        return open_db(self.uri)

    def worker_args(self):
        return [self.uri]


# FileStorage, and storages several processes share: ZEO, and RelStorage on
# PostgreSQL keeping history and not. Every ZODB test runs on each, but for
# those that name a reason not to.
STORES = ["filestorage", "zeo", "relstorage-hp", "relstorage-hf"]
SHARED_STORES = STORES[1:]


def make_store(request, kind, tmp_path):
    if kind == "filestorage":
        return Store(kind, f"file://{tmp_path}/data.fs")
    if kind == "zeo":
        return Store(kind, request.getfixturevalue("zeo_server").uri + "?wait_timeout=30")
    return Store(kind, request.getfixturevalue("relstorage_uris")[kind], request.getfixturevalue("postgres_server"))


@pytest.fixture(params=STORES)
def store(request, tmp_path):
    return make_store(request, request.param, tmp_path)


@pytest.fixture(params=SHARED_STORES)
def shared_store(request, tmp_path):
    """A storage two processes use at once."""
    return make_store(request, request.param, tmp_path)


@pytest.fixture
def key():
    """A root key of its own for each test (the servers' databases are shared)."""
    return "t-" + uuid.uuid4().hex


@pytest.fixture
def db(store):
    d = store.db()
    yield d
    transaction.abort()
    d.close()


def transaction_records(db, tid):
    """(oid, bytes) of each record the storage holds for transaction `tid`."""
    # RelStorage's iterator reads the view of its last sync (history-free:
    # the current records, grouped by the transaction that wrote them).
    sync = getattr(db.storage, "sync", None)
    if sync is not None:
        sync()
    it = db.storage.iterator(tid, tid)
    try:
        for txn in it:  # records are read while the iterator is open
            assert txn.tid == tid
            return [(r.oid, len(r.data or b"")) for r in txn]
        raise AssertionError(f"the storage does not list transaction {tid.hex()}")
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def written_with(db, obj):
    """Bytes the storage holds for the transaction that last wrote `obj`."""
    return sum(n for _, n in transaction_records(db, obj._p_serial))


def conn_pair(db):
    """Two connections with transaction managers of their own."""
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    return db.open(tm1), db.open(tm2)


def u8(vma):
    return np.ndarray((len(vma),), np.uint8, buffer=vma)


def new_zfile(conn, key, blksize=BLK):
    conn.root()[key] = zf = ZBigFile(blksize)
    conn.transaction_manager.commit()
    return zf


# ~~~ subprocess clients


class Worker:
    """A client process (tests/zodb_worker.py): call(op, **args) -> reply."""

    def __init__(self, store, tmp_path):
        self.store = store
        self.timed_out = False  # killed by call(), which reported why
        self.errpath = tmp_path / f"worker-{uuid.uuid4().hex[:8]}.err"
        self.err = open(self.errpath, "wb")
        self.p = subprocess.Popen(
            [sys.executable, WORKER, *store.worker_args()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
        )
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.p.stdout, selectors.EVENT_READ)

    def stderr(self):
        if not self.err.closed:
            self.err.flush()
        return self.errpath.read_text(errors="replace")[-12000:]

    def call(self, op, **args):
        args["op"] = op
        self.p.stdin.write(json.dumps(args) + "\n")
        self.p.stdin.flush()
        if not self.sel.select(timeout=REPLY_TIMEOUT):
            # what it was doing: its threads' stacks (faulthandler, on
            # SIGUSR1) and what its storage server was doing
            self.p.send_signal(signal.SIGUSR1)
            time.sleep(2)
            server = self.store.activity()
            self.timed_out = True
            self.p.kill()
            self.p.wait(timeout=30)
            pytest.fail(
                f"worker gave no reply to {args} within {REPLY_TIMEOUT}s; stderr:\n{self.stderr()}\n"
                f"server activity:\n{server}"
            )
        line = self.p.stdout.readline()
        if not line:
            pytest.fail(f"worker died on {args} (status {self.p.wait(timeout=30)}); stderr:\n{self.stderr()}")
        return json.loads(line)

    def ok(self, op, **args):
        r = self.call(op, **args)
        assert r["ok"], (op, args, r, self.stderr())
        return r

    def close(self):
        if self.p.poll() is None:
            try:
                self.call("exit")
            finally:
                try:
                    self.p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.p.kill()
                    self.p.wait(timeout=10)
        self.p.stdin.close()
        self.p.stdout.close()
        self.err.close()
        self.sel.close()
        assert self.timed_out or self.p.returncode == 0, self.stderr()


@pytest.fixture
def workers(tmp_path):
    """workers(store) starts a client process on `store`; all are closed after the test."""
    made = []

    def make(store):
        w = Worker(store, tmp_path)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


# ~~~ commit / abort


def test_commit_abort_roundtrip(store, db, key):
    conn = db.open()
    zf = new_zfile(conn, key)
    fh = zf.fileh_open()
    assert isinstance(fh, ZBigFileH)
    with fh.mmap(0, 4) as vma:
        a = u8(vma)
        a[0], a[BLK + 1], a[3 * BLK - 1] = 1, 2, 3
        assert fh.dirty_blocks() == [0, 1, 2]
        transaction.commit()
        assert not fh.isdirty()
        assert sorted(zf.blktab.keys()) == [0, 1, 2]

        a[0], a[3 * BLK] = 10, 20  # change a stored block, write a new one
        transaction.abort()
        assert not fh.isdirty()
        assert (a[0], a[BLK + 1], a[3 * BLK - 1], a[3 * BLK]) == (1, 2, 3, 0)
        assert sorted(zf.blktab.keys()) == [0, 1, 2]

        a[5] = 55  # a page-only change joins the transaction by itself
        transaction.commit()
        del a
    fh.close()
    conn.close()
    db.close()

    db2 = store.db()
    try:
        c = db2.open()
        zf = c.root()[key]
        with zf.fileh_open() as fh, fh.mmap(0, 4) as vma:
            a = u8(vma)
            assert (a[0], a[5], a[BLK + 1], a[3 * BLK - 1], a[3 * BLK]) == (1, 55, 2, 3, 0)
            assert int(a.astype(np.int64).sum()) == 1 + 55 + 2 + 3
            del a
        transaction.abort()
        c.close()
    finally:
        db2.close()


def test_new_zbigarray_written_before_first_commit(store, db, key):
    conn = db.open()
    conn.root()[key] = a = ZBigArray((3, 2), np.int32, blksize=BLK)
    with pytest.raises(ValueError, match="not in a ZODB connection"):
        a[:]  # only reachable from the root: not in the connection yet
    conn.add(a)
    a[:] = 0
    a.resize((0, 2))
    a.append(np.arange(20, dtype=np.int32).reshape(10, 2))
    transaction.commit()
    c2 = db.open(transaction.TransactionManager())
    b = c2.root()[key]
    assert b.shape == (10, 2) and b.dtype == np.int32
    assert (b[:] == np.arange(20).reshape(10, 2)).all()


def test_persistence_across_process_restart(store, workers, key):
    w = workers(store)
    w.ok("create", key=key, blksize=BLK)
    w.ok("append", key=key, n=100_000, value=3)
    w.ok("set", key=key, index=7, value=-5)
    w.ok("commit")
    w.ok("append", key=key, n=10, value=1000)  # never committed
    w.close()

    r = workers(store)
    got = r.ok("sum", key=key)
    assert got["shape"] == [100_000]
    assert got["sum"] == 3 * 99_999 - 5
    assert r.ok("get", key=key, indices=[0, 7, 99_999])["values"] == [3, -5, 3]


def test_zbigarray_resize_append_transactional(store, db, key):
    c1, c2 = conn_pair(db)
    c1.root()[key] = a = ZBigArray((0,), np.int64, blksize=BLK)
    c1.transaction_manager.commit()
    a.append(np.arange(10))
    c1.transaction_manager.commit()

    a.append(np.arange(100, 110))
    a.resize((25,))
    assert a.shape == (25,)
    c1.transaction_manager.abort()
    assert a.shape == (10,)
    assert (a[:] == np.arange(10)).all()

    c2.transaction_manager.begin()
    b = c2.root()[key]
    assert b.shape == (10,)
    a.resize((4,))
    c1.transaction_manager.commit()
    assert b.shape == (10,)  # c2 is still in its transaction
    c2.transaction_manager.begin()
    assert b.shape == (4,)
    assert (b[:] == np.arange(4)).all()
    b.resize((6,))  # growing back shows what the file holds there
    assert (b[:] == np.arange(6)).all()
    c2.transaction_manager.abort()


def test_handle_survives_connection_close_and_reopen(store, db, key):
    c = db.open()
    c.root()[key] = a = ZBigArray((10,), np.int64, blksize=BLK)
    transaction.commit()
    a[:] = 1
    transaction.commit()
    c.close()  # back to the pool, with its cache and the array's handle

    other = db.open(transaction.TransactionManager())
    b = other.root()[key]
    b[1] = 7  # committed while the first connection is closed
    other.transaction_manager.commit()

    c2 = db.open()
    a2 = c2.root()[key]
    assert (c2 is c) == (a2 is a)
    assert a2[:].sum() == 16  # the change made while closed is seen
    a2[0] = 5  # and the handle still commits with the connection
    transaction.commit()
    other.transaction_manager.begin()
    assert b[:].sum() == 20


# ~~~ isolation and invalidation


def test_isolation_and_invalidation(store, db, key):
    c1, c2 = conn_pair(db)
    tm1, tm2 = c1.transaction_manager, c2.transaction_manager
    zf1 = new_zfile(c1, key)
    fh1 = zf1.fileh_open()
    v1 = fh1.mmap(0, 8)
    a = u8(v1)
    a[0 * BLK] = a[1 * BLK] = a[2 * BLK] = 1
    tm1.commit()

    tm2.begin()
    zf2 = c2.root()[key]
    fh2 = zf2.fileh_open()
    v2 = fh2.mmap(0, 8)
    b = u8(v2)
    # c2 holds pages of blocks 0, 1 (data) and 5 (a hole)
    assert (b[0], b[BLK], b[5 * BLK]) == (1, 1, 0)

    # one commit changing a resident block, a block c2 has not read, and
    # filling the hole c2 holds
    a[0] = a[2 * BLK] = a[5 * BLK] = 2
    tm1.commit()

    # c2's transaction goes on seeing one state: the old one, loaded or not
    assert (b[0], b[BLK], b[2 * BLK], b[5 * BLK]) == (1, 1, 1, 0)
    tm2.begin()
    assert (b[0], b[BLK], b[2 * BLK], b[5 * BLK]) == (2, 1, 2, 2)
    assert fh2.page_state(1) == "loaded"  # unchanged blocks stay

    # an aborted change is never seen
    a[BLK] = 9
    tm1.abort()
    tm2.begin()
    assert b[BLK] == 1

    # a block whose format changes (a new ZBlk object replaces the old one)
    file_zodb_fmt = file_zodb.ZBlk_fmt_write
    try:
        file_zodb.ZBlk_fmt_write = "ZBlk0"
        a[BLK + 3] = 7
        tm1.commit()
        assert type(zf1.blktab[1]) is ZBlk0
        file_zodb.ZBlk_fmt_write = "ZBlk1"
        a[BLK + 4] = 8
        tm1.commit()
        assert type(zf1.blktab[1]) is ZBlk1
    finally:
        file_zodb.ZBlk_fmt_write = file_zodb_fmt
    tm2.begin()
    assert (b[BLK], b[BLK + 3], b[BLK + 4]) == (1, 7, 8)

    # the committer's own pages stay valid and clean
    assert not fh1.isdirty()
    assert (a[0], a[BLK + 4], a[5 * BLK]) == (2, 8, 2)
    del a, b
    v1.close(), v2.close()
    fh1.close(), fh2.close()
    tm1.abort(), tm2.abort()


def test_two_processes_see_committed_data_only(shared_store, workers, key):
    w, r = workers(shared_store), workers(shared_store)
    w.ok("create", key=key, blksize=BLK)
    r.ok("begin")
    assert r.ok("open", key=key)["shape"] == [0]

    w.ok("append", key=key, n=50_000, value=1)
    w.ok("set", key=key, index=0, value=100)
    w.ok("commit")
    # r's transaction began before that commit: it still sees the old state
    assert r.ok("info", key=key)["shape"] == [0]
    r.ok("begin")
    got = r.ok("sum", key=key)
    assert (got["shape"], got["sum"]) == ([50_000], 100 + 49_999)

    # r holds the pages now; w changes some, appends, aborts: r sees nothing
    w.ok("set", key=key, index=1, value=555)
    w.ok("append", key=key, n=10, value=9)
    w.ok("abort")
    r.ok("begin")
    got = r.ok("sum", key=key)
    assert (got["shape"], got["sum"]) == ([50_000], 100 + 49_999)

    # a change to a block r holds and to one it does not, in one commit
    w.ok("set", key=key, index=2, value=7)
    w.ok("set", key=key, index=40_000, value=7)
    w.ok("append", key=key, n=5, value=2)
    w.ok("commit")
    assert r.ok("get", key=key, indices=[2, 40_000])["values"] == [1, 1]
    r.ok("begin")
    assert r.ok("get", key=key, indices=[0, 2, 40_000, 50_004])["values"] == [100, 7, 7, 2]
    got = r.ok("sum", key=key)
    assert (got["shape"], got["sum"]) == ([50_005], 100 + 49_997 + 14 + 10)


# ~~~ conflicts


def test_conflict_same_block(store, db, key):
    c1, c2 = conn_pair(db)
    tm1, tm2 = c1.transaction_manager, c2.transaction_manager
    zf1 = new_zfile(c1, key)
    fh1 = zf1.fileh_open()
    a = u8(fh1.mmap(0, 4))
    a[0] = 1
    tm1.commit()
    tm2.begin()
    fh2 = c2.root()[key].fileh_open()
    b = u8(fh2.mmap(0, 4))
    assert b[0] == 1

    a[10] = 11
    b[20] = 22  # the same block, a different byte
    b[2 * BLK] = 33  # and another block
    tm1.commit()
    with pytest.raises(ConflictError):
        tm2.commit()
    # the loser's changes are still in memory, the database has the winner's
    assert fh2.isdirty() and (b[10], b[20], b[2 * BLK]) == (0, 22, 33)
    c3 = db.open(transaction.TransactionManager())
    with c3.root()[key].fileh_open() as fh3, fh3.mmap(0, 4) as v3:
        c3u = u8(v3)
        assert (c3u[10], c3u[20], c3u[2 * BLK]) == (11, 0, 0)
        del c3u
    # carried over the abort, the block changed by the winner cannot be
    # committed (that would lose the winner's change)
    fh2.carry_changes()
    tm2.abort()
    assert fh2.dirty_blocks() == [0, 2]
    with pytest.raises(ConflictError, match=r"blocks \[0\] were changed by another transaction"):
        tm2.commit()
    # abort drops them; done again on the new state, the commit goes through
    tm2.abort()
    assert not fh2.isdirty()
    assert (b[10], b[20], b[2 * BLK]) == (11, 0, 0)
    b[20] = 22
    tm2.commit()
    tm1.begin()
    assert (a[10], a[20]) == (11, 22)
    del a, b


def test_different_blocks_do_not_conflict(store, db, key):
    c1, c2 = conn_pair(db)
    tm1, tm2 = c1.transaction_manager, c2.transaction_manager
    zf1 = new_zfile(c1, key)
    a = u8(zf1.fileh_open().mmap(0, 4))
    a[0] = 1
    a[2 * BLK] = 1
    tm1.commit()
    tm2.begin()
    b = u8(c2.root()[key].fileh_open().mmap(0, 4))
    a[1] = 5
    b[2 * BLK + 1] = 6
    tm1.commit()
    tm2.commit()
    tm1.begin()
    tm2.begin()
    assert (a[1], a[2 * BLK + 1]) == (5, 6)
    assert (b[1], b[2 * BLK + 1]) == (5, 6)
    del a, b


def test_conflict_between_processes(shared_store, workers, key):
    w1, w2 = workers(shared_store), workers(shared_store)
    w1.ok("create", key=key, blksize=BLK)
    w1.ok("append", key=key, n=1000, value=0)
    w1.ok("commit")
    w2.ok("begin")
    w2.ok("open", key=key)

    w1.ok("set", key=key, index=1, value=11)
    w2.ok("set", key=key, index=2, value=22)
    w1.ok("commit")
    r = w2.call("commit")
    assert not r["ok"] and "Conflict" in r["error"], r
    assert w2.ok("info", key=key)["dirty"]
    assert w2.ok("get", key=key, indices=[1, 2])["values"] == [0, 22]  # still its own
    w2.ok("carry", key=key)
    w2.ok("abort")
    r = w2.call("commit")  # carried, but the block changed meanwhile
    assert not r["ok"] and r["error"] == "ConflictError" and "changed by another transaction" in r["msg"], r
    w2.ok("abort")
    assert w2.ok("get", key=key, indices=[1, 2])["values"] == [11, 0]
    w2.ok("set", key=key, index=2, value=22)
    w2.ok("commit")
    w1.ok("begin")
    assert w1.ok("get", key=key, indices=[1, 2])["values"] == [11, 22]


# ~~~ a commit failing in the middle


class StoreFault(Exception):
    pass


@pytest.mark.parametrize("then", ["abort", "carry"])
@pytest.mark.parametrize("where", ["storeblk", "storage"])
def test_failed_commit_keeps_memory_and_database_consistent(store, db, key, monkeypatch, where, then):
    c1, c2 = conn_pair(db)
    tm1 = c1.transaction_manager
    zf = new_zfile(c1, key)
    fh = zf.fileh_open()
    a = u8(fh.mmap(0, 4))
    a[0] = a[BLK] = a[2 * BLK] = 1
    tm1.commit()

    a[0] = a[BLK] = a[2 * BLK] = 2
    a[3 * BLK] = 2  # a new block too
    if where == "storeblk":
        # the second block's conversion to ZODB objects fails, after the
        # first one's objects were changed
        calls = []
        real = ZBlk1.setblkdata

        def failing(self, data):
            calls.append(1)
            if len(calls) == 2:
                raise StoreFault("injected")
            return real(self, data)

        monkeypatch.setattr(ZBlk1, "setblkdata", failing)
    else:
        # the storage fails while receiving the transaction's objects (the
        # connection's own storage: RelStorage gives each connection an
        # instance of its own)
        calls = []
        storage = c1._storage
        real_store = storage.store

        def failing_store(*args):
            calls.append(1)
            if len(calls) == 3:
                raise StoreFault("injected")
            return real_store(*args)

        monkeypatch.setattr(storage, "store", failing_store)
    with pytest.raises(StoreFault):
        tm1.commit()
    monkeypatch.undo()

    # memory: every change still there and dirty
    assert fh.dirty_blocks() == [0, 1, 2, 3]
    assert (a[0], a[BLK], a[2 * BLK], a[3 * BLK]) == (2, 2, 2, 2)
    # database: nothing of it, as another connection sees
    c2.transaction_manager.begin()
    with c2.root()[key].fileh_open() as fh2, fh2.mmap(0, 4) as v2:
        b = u8(v2)
        assert (b[0], b[BLK], b[2 * BLK], b[3 * BLK]) == (1, 1, 1, 0)
        del b
    assert sorted(c2.root()[key].blktab.keys()) == [0, 1, 2]
    if then == "carry":
        # the same changes committed again in the next transaction
        fh.carry_changes()
        tm1.abort()
        assert fh.dirty_blocks() == [0, 1, 2, 3]
        tm1.commit()
        assert not fh.isdirty()
        c2.transaction_manager.begin()
        with c2.root()[key].fileh_open() as fh2, fh2.mmap(0, 4) as v2:
            b = u8(v2)
            assert (b[0], b[BLK], b[2 * BLK], b[3 * BLK]) == (2, 2, 2, 2)
            del b
        del a
        return
    # ZODB requires the failed transaction to be aborted; that drops them
    tm1.abort()
    assert not fh.isdirty()
    assert (a[0], a[BLK], a[2 * BLK], a[3 * BLK]) == (1, 1, 1, 0)
    assert sorted(zf.blktab.keys()) == [0, 1, 2]
    # and the work redone commits
    a[0] = a[3 * BLK] = 3
    tm1.commit()
    c2.transaction_manager.begin()
    with c2.root()[key].fileh_open() as fh2, fh2.mmap(0, 4) as v2:
        b = u8(v2)
        assert (b[0], b[BLK], b[3 * BLK]) == (3, 1, 3)
        del b
    del a


# ~~~ bigger than RAM


def test_array_bigger_than_budget(store, workers, key):
    budget = 16 << 20
    total_bytes = 96 << 20
    n = total_bytes // 8
    w = workers(store)
    w.ok("create", key=key)  # 2 MiB blocks
    got = w.ok("append_range", key=key, start=0, n=n, chunk=(8 << 20) // 8, budget=budget)
    assert got["budget"] == budget
    assert got["peak_resident"] <= budget
    w.close()

    r = workers(store)
    got = r.ok("sum", key=key, chunk=(4 << 20) // 8, budget=budget)
    assert got["shape"] == [n]
    assert got["sum"] == n * (n - 1) // 2
    assert got["peak_resident"] <= budget
    # the kernel's count agrees: the pages are shared memory (memfd)
    assert got["pss_shmem_kb"] * 1024 <= budget + (2 << 20)


# ~~~ block formats


def test_block_formats_and_heuristic(store, db, key):
    conn = db.open()
    blksize = 2 << 20
    zf = new_zfile(conn, key, blksize)
    fh = zf.fileh_open()
    a = u8(fh.mmap(0, 4))
    # each commit below writes block 0 or 1: the bytes of its transaction
    written = lambda blk: written_with(db, zf.blktab[blk])  # noqa: E731

    a[:blksize] = 1  # a full new block
    a[blksize : blksize + 1000] = 1  # a partly filled new block (an append's tail)
    transaction.commit()
    assert type(zf.blktab[0]) is ZBlk0
    assert type(zf.blktab[1]) is ZBlk1

    # small change to a ZBlk1 block: only its chunk (and the ZBlk) is written
    a[blksize + 5000] = 7
    transaction.commit()
    assert type(zf.blktab[1]) is ZBlk1
    assert written(1) < 3 * ZBlk1.CHUNKSIZE

    # small change to a ZBlk0 block: it becomes ZBlk1, later small
    # changes are cheap
    a[10] = 7
    transaction.commit()
    assert type(zf.blktab[0]) is ZBlk1
    a[20] = 7
    transaction.commit()
    assert written(0) < 3 * ZBlk1.CHUNKSIZE

    # a big change (more than half of the chunks): whole block again
    a[: blksize // 2 + 2 * ZBlk1.CHUNKSIZE] = 3
    transaction.commit()
    assert type(zf.blktab[0]) is ZBlk0
    a[30] = 4
    a[40 + blksize // 2] = 4
    transaction.commit()  # small again: converted back
    assert type(zf.blktab[0]) is ZBlk1

    # forced formats
    old = file_zodb.ZBlk_fmt_write
    try:
        file_zodb.ZBlk_fmt_write = "ZBlk0"
        a[blksize + 6000] = 1
        transaction.commit()
        assert type(zf.blktab[1]) is ZBlk0
        a[blksize + 7000] = 1
        transaction.commit()
        assert written(1) > 7000  # the whole block (its 7001 bytes before trailing zeros) rewritten
    finally:
        file_zodb.ZBlk_fmt_write = old

    # appends: the growing tail block is ZBlk1; once the append moves
    # to the next block (here exactly at a block boundary), ZBlk0
    a[2 * blksize : 2 * blksize + 100] = 1
    transaction.commit()
    assert type(zf.blktab[2]) is ZBlk1
    a[3 * blksize : 3 * blksize + 100] = 1
    transaction.commit()
    assert (type(zf.blktab[2]), type(zf.blktab[3])) == (ZBlk0, ZBlk1)

    # everything reads back from a fresh connection
    expect = np.array(a)
    del a
    fh.close()
    transaction.abort()
    c2 = db.open(transaction.TransactionManager())
    with c2.root()[key].fileh_open() as fh2, fh2.mmap(0, 4) as v:
        assert (u8(v) == expect).all()


def test_zblk1_reads_chunks_of_another_size(store, db, key, monkeypatch):
    conn = db.open()
    zf = new_zfile(conn, key)
    monkeypatch.setattr(file_zodb, "ZBlk_fmt_write", "ZBlk1")
    monkeypatch.setattr(ZBlk1, "CHUNKSIZE", 1024)
    fh = zf.fileh_open()
    a = u8(fh.mmap(0, 1))
    a[::1000] = 5
    transaction.commit()
    assert len(zf.blktab[0].chunktab) == BLK // 1024
    monkeypatch.setattr(ZBlk1, "CHUNKSIZE", 4096)
    a[1] = 6  # rewritten with the current chunk size
    transaction.commit()
    assert len(zf.blktab[0].chunktab) == BLK // 4096
    expect = np.array(a)
    del a
    fh.close()
    c2 = db.open(transaction.TransactionManager())
    with c2.root()[key].fileh_open() as fh2, fh2.mmap(0, 1) as v:
        assert (u8(v) == expect).all()


# ~~~ misuse and names


def test_misuse(store, db):
    with pytest.raises(ValueError):
        ZBigFile(0)
    with pytest.raises(ValueError):
        ZBigFile(PS + 1)
    zf = ZBigFile(BLK)
    with pytest.raises(ValueError, match="not in a ZODB connection"):
        zf.fileh_open()
    conn = db.open()
    conn.add(zf)
    with pytest.raises(NotImplementedError, match="WCFS"):
        zf.fileh_open(_use_wcfs=True)
    zf.fileh_open(_use_wcfs=False).close()
    fh = zf.fileh_open()
    with pytest.raises(TypeError, match="transaction.commit"):
        fh.dirty_writeout(3)
    with pytest.raises(TypeError, match="transaction.abort"):
        fh.dirty_discard()
    with pytest.raises(RuntimeError, match="only after a commit of this handle failed"):
        fh.carry_changes()
    a = ZBigArray((4,), np.uint8)
    with pytest.raises(ValueError, match="not in a ZODB connection"):
        a[0]
    conn.add(a)
    a.fileh_open(budget=4 << 20)
    with pytest.raises(ValueError, match="already open"):
        a.fileh_open()
    fh.close()


def test_zbigfile_whose_addition_was_aborted(store, db):
    conn = db.open()
    zf = ZBigFile(BLK)
    conn.add(zf)
    fh = zf.fileh_open()
    transaction.abort()  # zf leaves the connection
    with fh.mmap(0, 1) as vma:
        a = u8(vma)
        a[0] = 1
        with pytest.raises(ValueError, match="no longer in the handle's ZODB connection"):
            transaction.commit()
        assert fh.isdirty() and a[0] == 1
        transaction.abort()
        assert not fh.isdirty() and a[0] == 0
        del a


def test_wendelin_names():
    from bigfile.file_zodb import ZBlk, ZBlk_fmt_registry, ZData, _ZBigFileH

    assert ZBlk is ZBlk0 and _ZBigFileH is ZBigFileH and ZData
    assert set(ZBlk_fmt_registry) == {"ZBlk0", "ZBlk1", "auto"}
    zf = ZBigFile(BLK)
    assert zf.blksize == BLK and isinstance(zf.blktab, LOBTree)
    assert zf.__getstate__()[0] == BLK
    a = ZBigArray((3, 4), np.float32, order="F", blksize=BLK)
    assert (a.shape, a.dtype, a.zfile.blksize) == ((3, 4), np.float32, BLK)
    assert a._v_fileh is None


def test_threads_faulting_blocks_at_once(store, db, key):
    """Page faults of several threads load blocks through the one
    connection: they must not use it at the same time."""
    import threading

    c1 = db.open()
    c1.root()[key] = a = ZBigArray((0,), np.int64, blksize=BLK)
    transaction.commit()
    n = 64 * BLK // 8
    a.append(np.arange(n, dtype=np.int64))
    transaction.commit()
    c2 = db.open(transaction.TransactionManager())
    b = c2.root()[key]
    sums = {}
    errors = []
    vma_arr = b[:]  # one mapping: the threads' reads fault its pages

    def read(t):
        try:
            part = n // 8
            sums[t] = int(vma_arr[t * part : (t + 1) * part].sum())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=read, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a reading thread hung"
    assert not errors
    assert sum(sums.values()) == n * (n - 1) // 2
    del vma_arr


# ~~~ review regressions


CS = ZBlk1.CHUNKSIZE


def _partly_filled(a, zf):
    a[:100] = 1  # a new block, partly filled: ZBlk1 under "auto"


def _full(a, zf):
    a[:BLK] = 1  # a new full block: ZBlk0 under "auto"


def _full_as_zblk1(a, zf):
    if zf is not None:
        zf.zblk_fmt = "ZBlk1"
    a[:BLK] = 1


def _small_change(a, zf):
    a[50] = 42  # one chunk


def _big_change(a, zf):
    a[CS:BLK] = 3  # most chunks


def _small_change_and_zblk0_format(a, zf):
    if zf is not None:
        zf.zblk_fmt = "ZBlk0"  # the ZBigFile changed by the same commit
    a[5] = 2


def _append_next_block(a, zf):
    a[BLK : BLK + 10] = 7  # creates block 1: block 0 is consolidated


def _tiny_change(a, zf):
    a[5] = 2


# A block's ZBlk replaced by a new object, each way it happens, against a
# change of the old object in place:
# name: (setup, ZBlk type after it, replacement, ZBlk_fmt_write during the
#        replacement's commit, in-place change)
REPLACEMENTS = {
    "auto-zblk1-to-zblk0": (_partly_filled, ZBlk1, _big_change, None, _small_change),
    "auto-zblk0-to-zblk1": (_full, ZBlk0, _tiny_change, None, _big_change),
    "zblk_fmt-change": (_full_as_zblk1, ZBlk1, _small_change_and_zblk0_format, None, _small_change),
    "ZBlk_fmt_write-change": (_partly_filled, ZBlk1, _tiny_change, "ZBlk0", _small_change),
    "consolidation": (_partly_filled, ZBlk1, _append_next_block, None, _small_change),
}


def read_fresh(db, key, nblk):
    """The first `nblk` blocks as a new connection reads them."""
    c = db.open(transaction.TransactionManager())
    try:
        with c.root()[key].fileh_open() as fh, fh.mmap(0, nblk) as vma:
            return u8(vma).copy()
    finally:
        c.transaction_manager.abort()
        c.close()


@pytest.mark.parametrize("first", ["replacement", "in-place"])
@pytest.mark.parametrize("path", sorted(REPLACEMENTS))
def test_replacement_and_in_place_change_of_a_block_conflict(store, db, key, path, first, monkeypatch):
    """Issue 15: one transaction replaces block 0's ZBlk with a new object,
    another changes the old ZBlk in place. Whichever commits first, the
    second gets ConflictError, and a fresh client sees exactly the
    winner's change; redone, the loser's change lands too. Before the fix,
    an in-place change committed after the replacement went into an object
    blktab no longer named: committed, and lost."""
    setup, kind, replace, fmt_write, in_place = REPLACEMENTS[path]
    c1, c2 = conn_pair(db)
    tm1, tm2 = c1.transaction_manager, c2.transaction_manager
    zf1 = new_zfile(c1, key)
    fh1 = zf1.fileh_open()
    a1 = u8(fh1.mmap(0, 2))
    model = np.zeros(2 * BLK, np.uint8)
    setup(a1, zf1)
    setup(model, None)
    tm1.commit()
    old = zf1.blktab[0]
    assert type(old) is kind

    tm2.begin()
    fh2 = c2.root()[key].fileh_open()
    a2 = u8(fh2.mmap(0, 2))
    assert (a2 == model).all()  # c2 holds block 0 of the same snapshot
    replace(a1, zf1)
    in_place(a2, None)

    def commit_replacement():
        if fmt_write is None:
            tm1.commit()
        else:
            with monkeypatch.context() as m:
                m.setattr(file_zodb, "ZBlk_fmt_write", fmt_write)
                tm1.commit()

    if first == "replacement":
        commit_replacement()
        assert zf1.blktab[0] is not old  # it was replaced
        replace(model, None)
        with pytest.raises(ConflictError):
            tm2.commit()
        tm2.abort()
        loser_redo = lambda: (in_place(a2, None), tm2.commit())  # noqa: E731
        loser_op = in_place
    else:
        tm2.commit()
        assert c2.root()[key].blktab[0]._p_oid == old._p_oid  # changed in place
        in_place(model, None)
        with pytest.raises(ConflictError):
            commit_replacement()
        tm1.abort()
        loser_redo = lambda: (replace(a1, zf1), commit_replacement())  # noqa: E731
        loser_op = replace
    got = read_fresh(db, key, 2)
    assert (got == model).all(), f"{np.flatnonzero(got != model)[:10]} differ from the winner's commit"

    tm1.begin()
    tm2.begin()
    loser_redo()
    loser_op(model, None)
    got = read_fresh(db, key, 2)
    assert (got == model).all(), f"{np.flatnonzero(got != model)[:10]} differ after the loser redid its change"
    del a1, a2
    fh1.close()
    fh2.close()


def test_each_object_stored_once_per_transaction(store, db, key):
    """Issue 15: a transaction that changes the ZBigFile itself (zblk_fmt)
    and has dirty pages, in one handle or two, stores the ZBigFile once:
    the handle used to register it again at commit, and two records of one
    object in one transaction corrupt a ZEO client's cache."""
    c1, c2 = conn_pair(db)
    tm1, tm2 = c1.transaction_manager, c2.transaction_manager
    zf = new_zfile(c1, key)
    fh1, fh2 = zf.fileh_open(), zf.fileh_open()
    a1, a2 = u8(fh1.mmap(0, 1)), u8(fh2.mmap(1, 1))  # block 0 in one handle, block 1 in the other

    def check(zfile_written):
        # the tid of the commit: block 0 is written by each (the DB's last
        # transaction may not be: RelStorage's lags behind its connections)
        oids = [oid for oid, _ in transaction_records(db, zf.blktab[0]._p_serial)]
        assert len(oids) == len(set(oids)), f"objects stored twice: {sorted(o for o in set(oids) if oids.count(o) > 1)}"
        assert (zf._p_oid in oids) == zfile_written

    for i, fmt in enumerate(["ZBlk1", "ZBlk0", "auto", ""]):
        zf.zblk_fmt = fmt  # the ZBigFile changed ...
        a1[i] = 1  # ... and pages of both handles dirty
        a2[i] = 2
        tm1.commit()
        check(zfile_written=True)
    a1[9] = a2[9] = 9  # the ZBigFile unchanged: joined, not written
    tm1.commit()
    check(zfile_written=False)

    # The ZBigFile invalidated (another connection changed it) before the commit.
    tm2.begin()
    zf2 = c2.root()[key]
    zf2.zblk_fmt = "ZBlk1"
    tm2.commit()
    tm1.begin()
    assert zf.zblk_fmt == "ZBlk1"
    a1[10] = 10
    tm1.commit()
    check(zfile_written=False)
    got = read_fresh(db, key, 2)
    assert list(got[[0, 1, 2, 3, 9, 10]]) == [1, 1, 1, 1, 9, 10]
    assert list(got[BLK + np.array([0, 1, 2, 3, 9])]) == [2, 2, 2, 2, 9]
    del a1, a2
    fh1.close()
    fh2.close()


def test_connection_close_drops_uncommitted_changes(store, db, key):
    """conn.close() without commit: the handle's changes are dropped (as
    those of ZODB objects are), not committed by the next user of the
    pooled connection."""
    tm = transaction.TransactionManager()
    c = db.open(tm)
    zf = new_zfile(c, key)
    c.root()["x"] = 0
    tm.commit()
    fh = zf.fileh_open()
    with fh.mmap(0, 1) as vma:
        u8(vma)[:4] = 9
    assert fh.isdirty()
    c.close()
    assert not fh.isdirty()
    tm2 = transaction.TransactionManager()
    c2 = db.open(tm2)
    assert c2 is c  # the pool's connection, with the handle's file
    c2.root()["x"] = 1
    tm2.commit()
    c3 = db.open(transaction.TransactionManager())
    fh3 = c3.root()[key].fileh_open()
    with fh3.mmap(0, 1) as vma:
        assert not u8(vma)[:4].any()
    with fh.mmap(0, 1) as vma:
        assert not u8(vma)[:4].any()
    fh3.close()
    fh.close()


def test_refused_close_keeps_changes(store, db, key):
    """ZBigFileH.close() refused because of a live mapping changes nothing:
    the changes are still there, and committed."""
    c = db.open(transaction.TransactionManager())
    tm = c.transaction_manager
    zf = new_zfile(c, key)
    fh = zf.fileh_open()
    vma = fh.mmap(0, 1)
    a = u8(vma)
    a[:4] = 7
    with pytest.raises(RuntimeError, match="live mapping"):
        fh.close()
    assert not fh.closed and fh.isdirty() and list(a[:4]) == [7] * 4
    tm.commit()
    c2 = db.open(transaction.TransactionManager())
    fh2 = c2.root()[key].fileh_open()
    with fh2.mmap(0, 1) as v2:
        assert list(u8(v2)[:4]) == [7] * 4
    fh2.close()
    a[:4] = 8  # dirty again: the close that succeeds drops it
    del a
    vma.close()
    fh.close()
    assert fh.closed
    tm.commit()
    with c2.root()[key].fileh_open() as fh3:
        c2.transaction_manager.begin()
        with fh3.mmap(0, 1) as v3:
            assert list(u8(v3)[:4]) == [7] * 4


def test_handle_leaves_transaction_manager_at_every_connection_close(store, db, key):
    """Each conn.close() unregisters the handle from the transaction
    manager (not only the first): a later commit of that manager, for
    another database, neither fails nor involves the handle."""
    db2 = open_db("memory://")  # another database
    try:
        tm = transaction.TransactionManager()
        c = db.open(tm)
        zf = new_zfile(c, key)
        fh = zf.fileh_open()
        vma = fh.mmap(0, 1)
        for _ in range(3):
            c.close()
            assert fh.transaction_manager is None
            c = db.open(tm)
            assert c.root()[key] is zf and fh.transaction_manager is tm
        u8(vma)[:4] = 3  # the handle still commits with its connection
        tm.commit()
        c.close()  # a close after several reopenings
        assert fh.transaction_manager is None
        u8(vma)[:4] = 5  # written through a mapping kept past the close
        d = db2.open(tm)
        d.root()["y"] = 1
        tm.commit()  # another database's commit on the same manager
        d.close()
        c = db.open(tm)  # not committed by the connection's next user either
        assert c.root()[key] is zf
        assert list(u8(vma)[:4]) == [3] * 4
        c.root()["x"] = 1
        tm.commit()
        c2 = db.open(transaction.TransactionManager())
        with c2.root()[key].fileh_open() as fh2, fh2.mmap(0, 1) as v2:
            assert list(u8(v2)[:4]) == [3] * 4
        vma.close()
        fh.close()
    finally:
        transaction.abort()
        db2.close()


def test_heuristic_counts_zero_chunks_past_stored_end_as_unchanged(store, db, key):
    """"auto": chunks past a ZBlk1's stored end that are still all zeros
    are not changes: a one-byte change in the last chunk of a partly
    filled block keeps it ZBlk1 (one chunk written, not the block)."""
    c = db.open(transaction.TransactionManager())
    tm = c.transaction_manager
    blksize = 2 << 20
    zf = new_zfile(c, key, blksize)
    fh = zf.fileh_open()
    with fh.mmap(0, blksize // PS) as vma:
        a = u8(vma)
        a[:100] = 1
        tm.commit()
        assert type(zf.blktab[0]) is ZBlk1
        a[blksize - 1] = 1
        tm.commit()
        assert type(zf.blktab[0]) is ZBlk1
        assert written_with(db, zf.blktab[0]) < 3 * ZBlk1.CHUNKSIZE
        assert file_zodb._count_changed(b"\1" * 10, b"\1" * 10 + bytes(100), 16) == 0
        assert file_zodb._count_changed(b"\1" * 10, b"\1" * 10 + bytes(40) + b"\2", 16) == 1
        del a
    fh.close()


def test_zblk_fmt_per_file_and_wendelin_state(store, db, key):
    """wendelin.core 2.x's ZBigFile state (blksize, blktab, zblk_fmt) and
    constructor argument: a file's own format wins over ZBlk_fmt_write;
    the 2-value state of older versions still loads."""
    with pytest.raises(ValueError, match="unknown ZBlk format"):
        ZBigFile(BLK, "ZBlk9")
    zf = ZBigFile(BLK)
    assert zf.zblk_fmt == "" and zf.__getstate__()[2] == ""
    old = ZBigFile(BLK)
    old.__setstate__((BLK, LOBTree()))
    assert old.zblk_fmt == "" and old.blksize == BLK
    c = db.open(transaction.TransactionManager())
    tm = c.transaction_manager
    c.root()[key] = zf1 = ZBigFile(BLK, "ZBlk1")
    c.root()[key + "0"] = zf0 = ZBigFile(BLK, zblk_fmt="ZBlk0")
    tm.commit()
    for zf_ in (zf0, zf1):
        with zf_.fileh_open() as fh, fh.mmap(0, BLK // PS) as vma:
            u8(vma)[:] = 1  # "auto" would write a full new block as ZBlk0
            tm.commit()
    assert type(zf1.blktab[0]) is ZBlk1 and type(zf0.blktab[0]) is ZBlk0
    c2 = db.open(transaction.TransactionManager())
    assert c2.root()[key].zblk_fmt == "ZBlk1" and c2.root()[key + "0"].zblk_fmt == "ZBlk0"


def test_compat_reads_wendelin_database(store, key, monkeypatch):
    """A database written by wendelin.core (classes under
    wendelin.bigfile.file_zodb, 3-value ZBigFile state) loads with
    bigfile.compat.DB (which bigfile.uri.open_db gives)."""
    import types

    from persistent import Persistent

    from bigfile.uri import resolve

    # stand-ins writing wendelin.core 2.x's module path and state layout
    mod = types.ModuleType("wendelin.bigfile.file_zodb")

    class WZBlk0(Persistent):
        def __getstate__(self):
            return self._v_blkdata

        def __setstate__(self, s):
            self._v_blkdata = s

    class WZBigFile(Persistent):
        def __init__(self, blksize, zblk_fmt=""):
            self.blksize, self.blktab, self.zblk_fmt = blksize, LOBTree(), zblk_fmt

        def __getstate__(self):
            return (self.blksize, self.blktab, self.zblk_fmt)

        def __setstate__(self, s):
            self.blksize, self.blktab, self.zblk_fmt = s

    for cls, name in ((WZBlk0, "ZBlk0"), (WZBigFile, "ZBigFile")):
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = mod.__name__
        setattr(mod, name, cls)
    fake = {"wendelin": types.ModuleType("wendelin"), "wendelin.bigfile": types.ModuleType("wendelin.bigfile")}
    fake[mod.__name__] = mod
    for name, m in fake.items():
        monkeypatch.setitem(sys.modules, name, m)
    factory, dbkw = resolve(store.uri)
    db = ZODB.DB(factory(), **dbkw)  # a plain ZODB.DB, as wendelin.core's programs open
    c = db.open(transaction.TransactionManager())
    z = WZBigFile(PS, "ZBlk0")
    b = WZBlk0()
    b._v_blkdata = b"\x07" * 10
    z.blktab[0] = b
    c.root()[key] = z
    c.transaction_manager.commit()
    db.close()
    for name in fake:
        monkeypatch.delitem(sys.modules, name)

    db = open_db(store.uri)
    try:
        c = db.open(transaction.TransactionManager())
        zf = c.root()[key]
        assert type(zf) is ZBigFile and zf.blksize == PS and zf.zblk_fmt == "ZBlk0"
        with zf.fileh_open() as fh, fh.mmap(0, 1) as vma:
            a = u8(vma)
            assert list(a[:11]) == [7] * 10 + [0]
            a[10] = 8
            c.transaction_manager.commit()
        assert type(zf.blktab[0]) is ZBlk0
    finally:
        db.close()
    db = open_db(store.uri)
    try:
        c = db.open(transaction.TransactionManager())
        with c.root()[key].fileh_open() as fh, fh.mmap(0, 1) as vma:
            assert list(u8(vma)[:12]) == [7] * 10 + [8, 0]
    finally:
        db.close()
