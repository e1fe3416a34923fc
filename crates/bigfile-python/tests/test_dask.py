"""bigfile.dask: ZBigArrays computed on by a dask.distributed LocalCluster of
two worker processes, against a real ZEO server (and RelStorage on a real
PostgreSQL server), and with the threaded scheduler."""

import json
import os
import signal
import subprocess
import sys
import uuid

import dask
import dask.array as da
import numpy as np
import pytest
import transaction
from distributed import Client, LocalCluster
from ZODB.POSException import ConflictError

from bigfile import dask as bdask
from bigfile.bigarray.array_zodb import ZBigArray
from bigfile.uri import open_db

N = (256 << 20) // 8  # a 256 MiB int64 array: arange(N), sums exact
HERE = os.path.dirname(os.path.abspath(__file__))

# distributed's own shutdown warnings are not ours, nor its warning that
# the threaded scheduler, which tests ask for explicitly, runs while the
# module's cluster client exists (older dask versions)
pytestmark = pytest.mark.filterwarnings(
    "ignore::ResourceWarning",
    "ignore::DeprecationWarning",
    "ignore:Running on a single-machine scheduler:UserWarning",
)


@pytest.fixture(scope="module")
def client():
    with dask.config.set({"distributed.worker.daemon": False}):
        # A dashboard on a port of its own (None means dask's default 8787,
        # taken by any other cluster running on the machine: a warning this
        # suite turns into an error).
        cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0",
                               memory_limit=None)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def new_key():
    return "d-" + uuid.uuid4().hex[:12]


def store_array(uri, key, values, blksize=2 << 20):
    """root[key] = values, written through bigfile in a client of its own."""
    db = open_db(uri)
    tm = transaction.TransactionManager()
    c = db.open(tm)
    try:
        c.root()[key] = a = ZBigArray(values.shape, values.dtype, blksize=blksize)
        tm.commit()
        step = (16 << 20) // values.itemsize
        for i in range(0, len(values), step):
            a[i : i + step] = values[i : i + step]
            tm.commit()
    finally:
        tm.abort()
        c.close()
        db.close()


def read_in_other_process(uri, key):
    """What a client in another process reads: shape, sum, samples, oid."""
    code = f"""
import json, sys, numpy as np, transaction
from bigfile.uri import open_db
db = open_db({uri!r})
c = db.open()
a = c.root()[{key!r}]
print(json.dumps({{"shape": list(a.shape), "sum": int(np.asarray(a[...]).sum(dtype=np.int64)),
                  "head": [int(v) for v in a[:5]], "tail": [int(v) for v in a[-3:]], "oid": a._p_oid.hex()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def zeo_array(zeo_server):
    """The ZEO server's URI and the key of arange(N) there."""
    key = new_key()
    store_array(zeo_server.uri, key, np.arange(N, dtype=np.int64))
    return zeo_server.uri, key


# ~~~ reading


def test_sum_and_mean_in_two_worker_processes(client, zeo_array):
    uri, key = zeo_array
    x = bdask.from_zbigarray(uri, key)
    assert x.shape == (N,) and x.dtype == np.int64
    assert set(x.chunks[0][:-1]) == {(128 << 20) // 8}  # whole 2 MiB blocks, 128 MiB a chunk
    assert int(x.sum().compute()) == N * (N - 1) // 2
    assert float(x.mean().compute()) == pytest.approx((N - 1) / 2, rel=1e-12)
    # several workers did the reading, each through its own connection (64
    # tasks: more than one worker's threads, so both workers get some)
    small = bdask.from_zbigarray(uri, key, chunks=N // 64)
    pids = small.map_blocks(lambda b: np.array([os.getpid()]), chunks=(1,), dtype=np.int64).compute()
    assert len(set(pids.tolist())) == 2 and os.getpid() not in pids
    assert int(small.sum().compute()) == N * (N - 1) // 2


def test_strided_slices(client, zeo_array):
    uri, key = zeo_array
    x = bdask.from_zbigarray(uri, key)
    ref = np.arange(N, dtype=np.int64)
    assert int(x[::7].sum().compute()) == int(ref[::7].sum())
    assert int(x[12345:-999:13].sum().compute()) == int(ref[12345:-999:13].sum())
    assert x[-5:].compute().tolist() == ref[-5:].tolist()


def test_a_dask_array_is_a_snapshot(client, zeo_server):
    """Commits made after from_zbigarray are not seen by its tasks."""
    key = new_key()
    store_array(zeo_server.uri, key, np.ones(1 << 20, np.int64))
    x = bdask.from_zbigarray(zeo_server.uri, key, chunks=1 << 18)
    db = open_db(zeo_server.uri)
    tm = transaction.TransactionManager()
    c = db.open(tm)
    c.root()[key][:] = 5
    tm.commit()
    c.close()
    db.close()
    assert int(x.sum().compute()) == 1 << 20
    assert int(bdask.from_zbigarray(zeo_server.uri, key).sum().compute()) == 5 << 20


def test_a_dask_array_sees_every_commit_finished_before(zeo_server):
    """Another client's commit, finished just before from_zbigarray, is in
    the snapshot (this process's cached database hears of it through ZEO's
    asynchronous invalidations: the snapshot must first ask the server)."""
    other = open_db(zeo_server.uri)
    try:
        for i in range(30):
            key = new_key()
            tm = transaction.TransactionManager()
            c = other.open(tm)
            c.root()[key] = a = ZBigArray((4,), np.int64)
            tm.commit()
            a[:] = i
            tm.commit()
            c.close()
            x = bdask.from_zbigarray(zeo_server.uri, key)
            assert x.compute(scheduler="threads").tolist() == [i] * 4
    finally:
        other.close()


# ~~~ writing


def test_to_zbigarray_read_back_by_another_client(client, zeo_array):
    uri, key = zeo_array
    x = bdask.from_zbigarray(uri, key)
    out = new_key()
    y = x[::2] * 3 + 1  # N/2 items: the chunks do not fall on block boundaries
    bdask.to_zbigarray(y, uri, out)
    ref = np.arange(N, dtype=np.int64)[::2] * 3 + 1
    got = read_in_other_process(uri, out)
    assert got["shape"] == [N // 2] and got["sum"] == int(ref.sum())
    assert got["head"] == ref[:5].tolist() and got["tail"] == ref[-3:].tolist()
    # replaced in place: the same object, new content
    bdask.to_zbigarray(y - 1, uri, out)
    again = read_in_other_process(uri, out)
    assert again["oid"] == got["oid"] and again["sum"] == int((ref - 1).sum())
    assert not staging_entries(uri)


def test_worker_killed_during_to_zbigarray(client, zeo_server, tmp_path):
    uri = zeo_server.uri
    key = new_key()
    n = (64 << 20) // 8
    marker = str(tmp_path / "killed")

    def kill_once(b, block_info=None):
        # the first time chunk 2 is computed, its worker dies (SIGKILL)
        if block_info[0]["chunk-location"][0] == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return b

    x = da.arange(n, dtype=np.int64, chunks=n // 8).map_blocks(kill_once, dtype=np.int64)
    bdask.to_zbigarray(x, uri, key, blksize=1 << 20)
    assert os.path.exists(marker)  # a worker did die, and its tasks ran again elsewhere
    got = read_in_other_process(uri, key)
    assert got["shape"] == [n] and got["sum"] == n * (n - 1) // 2
    assert not staging_entries(uri)


def test_failed_to_zbigarray_leaves_the_array_as_it_was(client, zeo_server):
    uri = zeo_server.uri
    key = new_key()
    n = 1 << 20
    store_array(uri, key, np.full(n, 7, np.int64))

    def fail_chunk_3(b, block_info=None):
        if block_info[0]["chunk-location"][0] == 3:
            raise ZeroDivisionError("chunk 3 cannot be computed")
        return b

    x = da.zeros(n, dtype=np.int64, chunks=n // 8).map_blocks(fail_chunk_3, dtype=np.int64)
    with pytest.raises(ZeroDivisionError, match="chunk 3"):
        bdask.to_zbigarray(x, uri, key)
    got = read_in_other_process(uri, key)
    assert got["sum"] == 7 * n  # untouched: no half-written array
    new = new_key()
    with pytest.raises(ZeroDivisionError):
        bdask.to_zbigarray(x, uri, new)
    db = open_db(uri)
    try:
        assert new not in db.open().root()
    finally:
        db.close()
    assert not staging_entries(uri)


def staging_entries(uri):
    db = open_db(uri)
    try:
        tab = db.open().root().get(bdask.STAGING)
        return list(tab.keys()) if tab is not None else []
    finally:
        db.close()


def test_replacement_conflicts_with_a_concurrent_change_of_the_old_content(zeo_server):
    """A transaction that changed the array before to_zbigarray replaced
    its content and commits after it gets ConflictError (its blocks would
    be written into the replaced block table), and sees the new content
    once it aborted."""
    uri = zeo_server.uri
    key = new_key()
    n = 1 << 18
    store_array(uri, key, np.zeros(n, np.int64), blksize=64 << 10)
    db = open_db(uri)
    tm = transaction.TransactionManager()
    c = db.open(tm)
    a = c.root()[key]
    a[10] = 99  # in place, not committed yet
    with dask.config.set(scheduler="threads"):
        bdask.to_zbigarray(da.full(n, 4, dtype=np.int64, chunks=n // 4), uri, key)
    with pytest.raises(ConflictError):
        tm.commit()
    tm.abort()
    assert int(a[10]) == 4 and int(np.asarray(a[...]).sum()) == 4 * n
    c.close()
    db.close()


# ~~~ the threaded scheduler, other storages


@pytest.mark.parametrize("kind", ["filestorage", "relstorage-hp", "relstorage-hf"])
def test_threaded_scheduler(kind, request, tmp_path):
    if kind == "filestorage":
        uri = f"file://{tmp_path}/data.fs"
    else:
        uri = request.getfixturevalue("relstorage_uris")[kind]
    key = new_key()
    n = (24 << 20) // 8
    with dask.config.set(scheduler="threads"):
        x = da.arange(n, dtype=np.int64, chunks=n // 5)
        bdask.to_zbigarray(x * 2, uri, key)
        y = bdask.from_zbigarray(uri, key, chunks=n // 7)
        assert int(y.sum().compute()) == n * (n - 1)
        assert int(y[3::11].sum().compute()) == int((np.arange(n)[3::11] * 2).sum())
        bdask.to_zbigarray(y // 2 + 1, uri, key)  # replaced from itself
        assert int(bdask.from_zbigarray(uri, key).sum().compute()) == n * (n - 1) // 2 + n
    bdask._dbs.pop(uri).close()  # the FileStorage is this process's until closed


def test_relstorage_with_worker_processes(client, relstorage_uris):
    uri = relstorage_uris["relstorage-hp"]
    key = new_key()
    n = (32 << 20) // 8
    bdask.to_zbigarray(da.arange(n, dtype=np.int64, chunks=n // 4), uri, key)
    x = bdask.from_zbigarray(uri, key, chunks=n // 8)
    assert int(x.sum().compute()) == n * (n - 1) // 2
    assert read_in_other_process(uri, key)["sum"] == n * (n - 1) // 2


# ~~~ bad input: refused in the client, before any task


def test_bad_input(zeo_array, zeo_server, tmp_path):
    uri, key = zeo_array
    x = da.zeros(10, dtype=np.int64, chunks=5)
    with pytest.raises(ValueError, match="unknown scheme 'bogus'"):
        bdask.from_zbigarray("bogus://x", key)
    with pytest.raises(ValueError, match="unknown scheme"):
        bdask.to_zbigarray(x, "bogus://x", key)
    with pytest.raises(KeyError, match="no 'nothing-here' in the database root"):
        bdask.from_zbigarray(uri, "nothing-here")
    other = new_key()
    db = open_db(uri)
    tm = transaction.TransactionManager()
    c = db.open(tm)
    c.root()[other] = {"not": "an array"}
    tm.commit()
    c.close()
    db.close()
    with pytest.raises(TypeError, match="not a ZBigArray"):
        bdask.from_zbigarray(uri, other)
    with pytest.raises(TypeError, match="not a ZBigArray"):
        bdask.to_zbigarray(x, uri, other)
    with pytest.raises(ValueError, match="same shape and dtype"):
        bdask.to_zbigarray(x, uri, key)  # (10,) onto (N,)
    with pytest.raises(ValueError, match="same shape and dtype"):
        bdask.to_zbigarray(da.zeros(N, dtype=np.int32, chunks=N // 4), uri, key)
    with pytest.raises(TypeError, match="Python objects"):
        bdask.to_zbigarray(da.from_array(np.array([None, 1], dtype=object), chunks=1), uri, new_key())
    with pytest.raises(ValueError, match="not known"):
        bdask.to_zbigarray(x[x > 0], uri, new_key())
    assert not staging_entries(uri)
