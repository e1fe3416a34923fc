"""How long a ZBigFileH lives: as any object once the program dropped it,
but not before its mappings are gone and its changes committed or aborted."""

import gc
import mmap
import weakref

import numpy as np
import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from bigfile import RAM
from bigfile.file_zodb import ZBigFile

from conftest import DataFile, open_conn

PS = mmap.PAGESIZE


@pytest.fixture
def db(tmp_path):
    db = ZODB.DB(FileStorage(str(tmp_path / "h.fs")))
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def conn(db):
    yield from open_conn(db)


def new_file(conn, nblocks):
    """A committed ZBigFile of `nblocks` one-page blocks, block i all bytes i+1."""
    conn.root()["f"] = zf = ZBigFile(PS)
    conn.transaction_manager.commit()
    fh = zf.fileh_open()
    with fh.mmap(0, nblocks) as vma:
        a = np.ndarray((nblocks, PS), np.uint8, vma)
        a[:] = (np.arange(nblocks, dtype=np.uint8) + 1)[:, None]
        del a
    conn.transaction_manager.commit()
    fh.close()
    return zf


def close_callbacks(conn):
    return len(conn._Connection__onCloseCallbacks or ())


def test_dropped_handles_do_not_accumulate(conn):
    """1000 handles opened, mapped, read and dropped within one transaction:
    each goes when dropped, with its pages; nothing piles up in the file,
    the transaction manager or the connection."""
    zf = new_file(conn, 2)
    tm = conn.transaction_manager
    ram = RAM(f"memfd,pagesize={PS // 1024}K", budget=64 * PS)
    synchs, callbacks = len(tm._synchs), close_callbacks(conn)
    alive = []
    for i in range(1000):
        fh = zf.fileh_open(ram=ram)
        alive.append(weakref.ref(fh))
        vma = fh.mmap(0, 2)
        with memoryview(vma) as m:
            assert m[0] == 1 and m[PS] == 2
        assert ram.stats()["resident_pages"] == 2
        del vma, fh
        # no garbage collection: dropping the last reference frees them
        if i % 100 == 99:
            assert sum(r() is not None for r in alive) == 0
            assert len(zf._v_filehset) == 0 and len(zf._v_filehpinned) == 0
            assert ram.stats()["resident_pages"] == 0
            assert len(tm._synchs) == synchs
            assert close_callbacks(conn) <= max(callbacks, 1)
    assert ram.stats()["loads"] == 2000
    tm.commit()


def test_handle_kept_while_mapped_then_let_go(conn, db):
    zf = new_file(conn, 3)
    tm = conn.transaction_manager
    fh = zf.fileh_open()
    ref = weakref.ref(fh)
    vma = fh.mmap(0, 3)
    a = np.ndarray((3, PS), np.uint8, vma)
    del fh
    # the mapping is in use: its writes must reach the transaction
    assert ref() is not None and ref() in zf._v_filehset
    a[1, :] = 20
    tm.commit()
    a[2, :] = 30
    tm.abort()
    assert a[2, 0] == 3
    assert ref() is not None
    del a, vma
    assert ref() is None and len(zf._v_filehset) == 0
    c2 = db.open(transaction.TransactionManager())
    try:
        with c2.root()["f"].fileh_open() as fh2, fh2.mmap(0, 3) as v2, memoryview(v2) as m:
            assert (m[0], m[PS], m[2 * PS]) == (1, 20, 3)
    finally:
        c2.close()


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_handle_with_changes_kept_until_transaction_ends(conn, db, end):
    zf = new_file(conn, 2)
    tm = conn.transaction_manager
    fh = zf.fileh_open()
    ref = weakref.ref(fh)
    with fh.mmap(0, 2) as vma, memoryview(vma) as m:
        m[PS] = 99  # block 1 dirty
    del fh, vma
    gc.collect()
    assert ref() is not None and ref().isdirty()  # its changes are still to commit or abort
    getattr(tm, end)()
    assert ref() is None and len(zf._v_filehpinned) == 0
    c2 = db.open(transaction.TransactionManager())
    try:
        with c2.root()["f"].fileh_open() as fh2, fh2.mmap(1, 1) as v2, memoryview(v2) as m:
            assert m[0] == (99 if end == "commit" else 2)
    finally:
        c2.close()


def test_handle_kept_by_program_stays_synchronized(conn):
    """Unpinned (no mapping, no change) is not forgotten: a handle the
    program holds keeps taking part in its connection's transactions."""
    zf = new_file(conn, 1)
    tm = conn.transaction_manager
    fh = zf.fileh_open()
    with fh.mmap(0, 1) as vma, memoryview(vma) as m:
        m[0] = 7
    tm.commit()
    assert fh not in zf._v_filehpinned and fh in zf._v_filehset
    with fh.mmap(0, 1) as vma, memoryview(vma) as m:
        m[0] = 8
        assert fh in zf._v_filehpinned
    tm.abort()
    with fh.mmap(0, 1) as vma, memoryview(vma) as m:
        assert m[0] == 7
    fh.close()
    assert fh not in zf._v_filehset


def test_handle_of_closed_connection_collected(db):
    """wendelin.core's test_bigfile_filezodb_fileh_gc: a handle dropped
    with its connection closed is gone once another handle is in use."""
    c1 = db.open()
    c1.root()["f"] = zf1 = ZBigFile(PS)
    transaction.commit()
    fh1 = zf1.fileh_open()
    vma1 = fh1.mmap(0, 1)
    ref = weakref.ref(fh1)
    c1.close()
    del vma1, fh1, zf1
    c2 = db.open()
    try:
        fh2 = c2.root()["f"].fileh_open()
        vma2 = fh2.mmap(0, 1)
        gc.collect()
        assert ref() is None
        del vma2, fh2
    finally:
        transaction.abort()
        c2.close()


def test_uses_mmap_overlay_is_false(conn):
    zf = new_file(conn, 1)
    with zf.fileh_open() as zfh:
        assert zfh.uses_mmap_overlay() is False
    with DataFile(PS).fileh_open() as fh:
        assert fh.uses_mmap_overlay() is False
