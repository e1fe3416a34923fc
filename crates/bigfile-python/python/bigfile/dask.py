"""ZBigArrays in Dask: a computation spread over the processes (and
machines) of a Dask cluster, each worker reading and writing the array
through ZODB connections of its own.

    import dask.array as da
    from bigfile.dask import from_zbigarray, to_zbigarray

    x = from_zbigarray("zeo://dbhost:8100", "a")   # root["a"], a ZBigArray
    print(x.mean().compute())
    to_zbigarray(x[::2] * 2, "zeo://dbhost:8100", "b")  # computed, stored as root["b"]

The graph carries the database URI (see ``bigfile.uri``), the array's
name, the snapshot and the slices, never data: each worker process opens
the database once (cached per process and URI) and each of its threads a
connection, so pages are loaded where they are used, within that
process's RAM budget. The URI must reach the same database from every
worker: ``zeo://`` and ``postgres://`` from anywhere; ``file://`` and
``memory://`` only with the threaded scheduler, whose workers share the
client's process (a FileStorage is opened by one process at a time, a
memory database exists in one). Without a ``dask.distributed`` client the threaded
scheduler runs the same tasks in threads.

Reading. ``from_zbigarray`` records the database's last transaction (every
commit finished before the call, from any client, is in it); every task
reads the array as of that transaction (a historical connection), so the
dask array is a snapshot, however the array changes while it is computed. On a storage that keeps no history (RelStorage with
``keep_history=false``) the tasks read the current state instead, and a
task fails if the array's shape or dtype changed meanwhile.

Writing. ``to_zbigarray`` stores a dask array as ``root[name]`` with all or
nothing, in three steps:

1. the client checks everything it can before scheduling anything (the
   URI, the name's current object, shape, dtype), then creates an empty
   *staging* ZBigFile with the target's block size, kept under
   ``root["__bigfile_staging__"]`` (so that a pack does not collect it);
2. the workers compute their chunks, rechunked along the major axis, and
   each writes the whole blocks of its chunk into the staging file, in
   transactions of their own (a few MiB each, retried on a conflict; a
   task run again after a worker died writes the same blocks again); the
   at most two blocks a chunk shares with its neighbours go back to the
   client, which writes them;
3. one transaction installs the result: a new ``ZBigArray`` whose file is
   the staging file, or, for an existing array (same shape and dtype, so
   that references to it stay valid), its file's block table replaced by
   the staging file's. Other clients see the new content at their next
   transaction; a transaction that changed the old content concurrently
   fails with ``ConflictError`` when it commits after the replacement
   (every block write reads the ZBigFile as current).

Until step 3 commits, ``root[name]`` is as it was; if anything fails
before (a task error, a storage error, conflicts that do not go away), the
staging file is removed and the error raised. A client killed during the
call leaves its staging file under ``root["__bigfile_staging__"]``:
``drop_staging(uri, older_than)`` removes such leftovers.
"""

import collections
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["from_zbigarray", "to_zbigarray", "drop_staging", "STAGING"]

#: The root key under which to_zbigarray keeps its staging files.
STAGING = "__bigfile_staging__"
#: Bytes a chunk holds by default, rounded to whole blocks.
CHUNK_BYTES = 128 << 20
#: Bytes of blocks a worker writes per transaction.
BATCH_BYTES = 32 << 20
#: Commits retried on ConflictError before giving up.
ATTEMPTS = 10
#: Connections a worker thread keeps open (the newest snapshots).
KEEP_CONNECTIONS = 8

_dbs: Dict[str, Any] = {}
# Held to open databases and connections: a DB's own storage is not safe to
# use from several threads at once (DB.open(at=...) asks RelStorage's for
# its last transaction, through one SQL connection), and both are rare.
_dbs_lock = threading.RLock()
_local = threading.local()


# ~~~ per process and thread: databases and connections


def _db(uri: str) -> Any:
    """The database of `uri`, opened once per process."""
    from bigfile.uri import open_db

    with _dbs_lock:
        db = _dbs.get(uri)
        if db is None:
            db = _dbs[uri] = open_db(uri)
        return db


def _connection(uri: str, at: Optional[bytes]) -> Tuple[Any, Any]:
    """This thread's (transaction manager, connection) on `uri`: as of
    transaction `at` (read-only), or current (`at` None)."""
    import transaction

    conns: "collections.OrderedDict[Tuple[str, Optional[bytes]], Tuple[Any, Any]]"
    conns = _local.__dict__.setdefault("conns", collections.OrderedDict())
    key = (uri, at)
    tc = conns.get(key)
    if tc is not None and tc[1].opened:
        conns.move_to_end(key)
        return tc
    tm = transaction.TransactionManager()
    with _dbs_lock:
        db = _db(uri)
        conn = db.open(tm, at=at) if at is not None else db.open(tm)
    conns[key] = (tm, conn)
    while len(conns) > KEEP_CONNECTIONS:
        _, (old_tm, old) = conns.popitem(last=False)
        old_tm.abort()
        old.close()
    return tm, conn


def _keeps_history(db: Any) -> bool:
    return bool(getattr(db.storage, "keep_history", True))


def _last_transaction(uri: str, db: Any) -> bytes:
    """The database's last transaction, as of now: every commit finished
    before this call is in it. A transaction begun on a connection first
    synchronizes the storage (a ZEO client opened with ``server_sync``, as
    bigfile.uri does by default, asks the server and so receives every
    earlier commit's invalidations; without it the DB's last transaction
    may lag a few milliseconds behind other clients' commits). A storage
    that keeps a view per connection (RelStorage) updates the DB's own view
    only when asked to poll."""
    tm, _conn = _connection(uri, None)
    tm.begin()
    tm.abort()
    with _dbs_lock:
        poll = getattr(db.storage, "poll_invalidations", None)
        if poll is not None:
            poll()
        tid: bytes = db.lastTransaction()
    return tid


def _zbigarray(root: Any, uri: str, name: str) -> Any:
    from bigfile.bigarray.array_zodb import ZBigArray

    if name not in root:
        names = sorted(k for k in root.keys() if isinstance(k, str) and k != STAGING)
        raise KeyError(f"{uri}: no {name!r} in the database root (names there: {names[:20]})")
    arr = root[name]
    if not isinstance(arr, ZBigArray):
        raise TypeError(f"{uri}: root[{name!r}] is a {type(arr).__module__}.{type(arr).__name__}, not a ZBigArray")
    return arr


def _major(order: str, ndim: int) -> int:
    return 0 if order == "C" else ndim - 1


def _default_rows(shape: Sequence[int], itemsize: int, order: str, blksize: int) -> int:
    """Items of the major axis per chunk: about CHUNK_BYTES, whole blocks
    when the major axis's slices fit blocks exactly."""
    major = _major(order, len(shape))
    row = itemsize * int(np.prod([d for i, d in enumerate(shape) if i != major], dtype=np.int64))
    blocks = max(1, CHUNK_BYTES // blksize)
    if row and blksize % row == 0:
        return blocks * (blksize // row)
    return max(1, -(-blocks * blksize // max(row, 1)))


# ~~~ reading


class _Source:
    """What a task needs to read a slice of ``root[name]``: the URI, the
    name, the snapshot (None: current) and what the array was then. A
    numpy-like object for ``dask.array.from_array``; pickled into the
    graph, it holds no data."""

    def __init__(self, uri: str, name: str, at: Optional[bytes], shape: Tuple[int, ...], dtype: np.dtype) -> None:
        self.uri, self.name, self.at = uri, name, at
        self.shape, self.dtype, self.ndim = shape, dtype, len(shape)

    def __getitem__(self, idx: Any) -> np.ndarray:
        tm, conn = _connection(self.uri, self.at)
        if self.at is None:
            tm.begin()  # the current state, this task's own transaction
        arr = _zbigarray(conn.root(), self.uri, self.name)
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise RuntimeError(
                f"{self.uri}: root[{self.name!r}] is now {arr.shape} {arr.dtype}, was {self.shape} {self.dtype}"
                " when from_zbigarray was called (the storage keeps no history, so the array is read as it is)"
            )
        out = np.array(arr[idx])  # a copy: the mapping's pages stay behind
        if self.at is None:
            tm.abort()
        return out


def from_zbigarray(uri: str, name: str, chunks: Any = None) -> Any:
    """``root[name]`` of the database at `uri`, a ZBigArray, as a
    ``dask.array.Array`` whose tasks read their slices in the workers (see
    the module docs). `chunks` as ``dask.array.from_array``'s; by default
    whole blocks along the major axis, about 128 MiB a chunk. Raises
    ValueError for a bad URI, KeyError for a missing name, TypeError if it
    is not a ZBigArray, before any task exists."""
    import dask.array as da
    from dask.base import tokenize

    db = _db(uri)
    at = _last_transaction(uri, db) if _keeps_history(db) else None
    tm, conn = _connection(uri, at)
    if at is None:
        tm.begin()
    try:
        arr = _zbigarray(conn.root(), uri, name)
        shape, dtype, order, blksize = arr.shape, arr.dtype, arr._order, arr.zfile.blksize
    finally:
        if at is None:
            tm.abort()
    if chunks is None:
        major = _major(order, len(shape))
        rows = _default_rows(shape, dtype.itemsize, order, blksize)
        chunks = tuple(rows if i == major else -1 for i in range(len(shape)))
    source = _Source(uri, name, at, shape, dtype)
    token = tokenize(uri, name, at, shape, str(dtype), chunks)
    return da.from_array(source, chunks=chunks, name=f"zbigarray-{name}-{token}", lock=False, fancy=False,
                         asarray=False, meta=np.empty((0,) * len(shape), dtype))


# ~~~ writing


def _staging(conn: Any, token: str) -> Any:
    tab = conn.root().get(STAGING)
    zfile = tab.get(token) if tab is not None else None
    if zfile is None:
        raise RuntimeError(f"the staging file {token!r} of to_zbigarray is gone (removed by drop_staging?)")
    return zfile


def _commit_retrying(tm: Any, work: Any) -> Any:
    """Run `work()` in a transaction and commit, again on ConflictError."""
    from ZODB.POSException import ConflictError

    for attempt in range(ATTEMPTS):
        tm.begin()
        try:
            out = work()
            tm.commit()
            return out
        except ConflictError:
            tm.abort()
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
        except BaseException:
            tm.abort()
            raise


def _write_blocks(uri: str, token: str, first: int, raw: np.ndarray, blksize: int) -> List[int]:
    """Write `raw`, whole blocks from block `first`, into the staging file;
    the blocks written (all-zero ones stay holes, which read as zeros)."""
    tm, conn = _connection(uri, None)
    tm.begin()
    fh = _staging(conn, token).fileh_open(budget=BATCH_BYTES + 2 * blksize)
    written = []
    try:
        per = max(1, BATCH_BYTES // blksize)
        nblk = len(raw) // blksize
        for b0 in range(0, nblk, per):
            n = min(per, nblk - b0)
            nonzero = [b for b in range(b0, b0 + n) if raw[b * blksize : (b + 1) * blksize].any()]
            if not nonzero:
                continue

            def work(b0: int = b0, n: int = n, nonzero: List[int] = nonzero) -> None:
                with fh.mmap(first + b0, n) as vma:
                    dst = np.frombuffer(vma, np.uint8)
                    for b in nonzero:
                        dst[(b - b0) * blksize : (b - b0 + 1) * blksize] = raw[b * blksize : (b + 1) * blksize]
                    del dst

            _commit_retrying(tm, work)
            written += [first + b for b in nonzero]
    finally:
        tm.abort()
        fh.close()
    return written


def _store_chunk(data: np.ndarray, uri: str, token: str, lo: int, order: str, blksize: int) -> Dict[str, Any]:
    """A task: the chunk holding bytes [lo, lo + its size) of the array's
    file. Writes the whole blocks inside that range; returns the blocks
    written and the pieces of the blocks it shares with its neighbours."""
    raw = np.ravel(np.asarray(data), order=order).view(np.uint8)
    hi = lo + len(raw)
    b0, b1 = -(-lo // blksize), hi // blksize  # the whole blocks inside [lo, hi)
    if b0 >= b1:
        return {"written": [], "pieces": [(lo, raw.tobytes())]}
    pieces = []
    if lo < b0 * blksize:
        pieces.append((lo, raw[: b0 * blksize - lo].tobytes()))
    if b1 * blksize < hi:
        pieces.append((b1 * blksize, raw[b1 * blksize - lo :].tobytes()))
    written = _write_blocks(uri, token, b0, raw[b0 * blksize - lo : b1 * blksize - lo], blksize)
    return {"written": written, "pieces": pieces}


def _write_pieces(uri: str, token: str, pieces: List[Tuple[int, bytes]], blksize: int) -> List[int]:
    """The client's part: the blocks shared by two chunks, put together."""
    blocks: Dict[int, np.ndarray] = {}
    for off, data in pieces:
        buf = np.frombuffer(data, np.uint8)
        while len(buf):
            b, o = divmod(off, blksize)
            n = min(len(buf), blksize - o)
            blk = blocks.setdefault(b, np.zeros(blksize, np.uint8))
            blk[o : o + n] = buf[:n]
            off, buf = off + n, buf[n:]
    written = []
    for b in sorted(blocks):
        written += _write_blocks(uri, token, b, blocks[b], blksize)
    return written


def _check_target(root: Any, uri: str, name: str, shape: Tuple[int, ...], dtype: np.dtype) -> Any:
    """The ZBigArray `name` to replace (None: to create), after checking it
    can take an array of `shape` and `dtype`."""
    if name not in root:
        return None
    arr = _zbigarray(root, uri, name)
    if arr.shape != shape or arr.dtype != dtype:
        raise ValueError(
            f"{uri}: root[{name!r}] is a ZBigArray of {arr.shape} {arr.dtype}; to_zbigarray replaces the content of"
            f" an array of the same shape and dtype only, not {shape} {dtype}"
        )
    return arr


def to_zbigarray(darray: Any, uri: str, name: str, blksize: int = 2 << 20) -> None:
    """Compute `darray` in the workers and store it as the ZBigArray
    ``root[name]`` of the database at `uri`: created (C order, `blksize`
    bytes a block), or, if there is one of the same shape and dtype, its
    content replaced. All or nothing; see the module docs for the
    transaction scheme. Raises before scheduling anything: ValueError for
    a bad URI, unknown chunk sizes or a shape/dtype mismatch, TypeError if
    ``root[name]`` is not a ZBigArray or the dtype cannot be stored."""
    import dask
    import dask.array as da

    from bigfile.file_zodb import ZBigFile

    if not isinstance(darray, da.Array):
        raise TypeError(f"to_zbigarray stores a dask.array.Array, not {type(darray).__name__}")
    if any(np.isnan(d) for d in darray.shape):
        raise ValueError(f"to_zbigarray: the dask array's shape {darray.shape} is not known; compute_chunk_sizes() first")
    shape = tuple(int(d) for d in darray.shape)
    dtype = np.dtype(darray.dtype)
    if dtype.hasobject:
        raise TypeError(f"to_zbigarray: {dtype} holds Python objects, which a ZBigArray cannot store")
    token = f"{name}:{uuid.uuid4().hex}"
    tm, conn = _connection(uri, None)

    def begin() -> Tuple[str, int]:
        root = conn.root()
        old = _check_target(root, uri, name, shape, dtype)
        order, bs = (old._order, old.zfile.blksize) if old is not None else ("C", blksize)
        from BTrees.OOBTree import OOBTree

        if STAGING not in root:
            root[STAGING] = OOBTree()
        root[STAGING][token] = ZBigFile(bs)
        return order, bs

    order, bs = _commit_retrying(tm, begin)
    try:
        major = _major(order, len(shape))
        rows = _default_rows(shape, dtype.itemsize, order, bs)
        x = darray.rechunk(tuple(rows if i == major else -1 for i in range(len(shape))))
        row = dtype.itemsize * int(np.prod([d for i, d in enumerate(shape) if i != major], dtype=np.int64))
        starts = np.cumsum((0,) + x.chunks[major])[:-1]
        parts = x.to_delayed().reshape(-1)
        store = dask.delayed(_store_chunk, pure=False)
        tasks = [store(p, uri, token, int(s) * row, order, bs) for p, s in zip(parts, starts)]
        results = dask.compute(*tasks)
        written = {b for r in results for b in r["written"]}
        written |= set(_write_pieces(uri, token, [p for r in results for p in r["pieces"]], bs))

        def install() -> None:
            root = conn.root()
            staging = _staging(conn, token)
            missing = written.difference(staging.blktab.keys())
            if missing:
                raise RuntimeError(f"to_zbigarray: blocks {sorted(missing)[:10]} written by the workers are not in"
                                   " this transaction's view of the staging file")
            old = _check_target(root, uri, name, shape, dtype)
            if old is None:
                from bigfile.bigarray.array_zodb import ZBigArray

                new = ZBigArray(shape, dtype, order, bs)
                new.zfile = staging
                root[name] = new
            else:
                if old._order != order or old.zfile.blksize != bs:
                    raise ValueError(f"{uri}: root[{name!r}] changed its layout during to_zbigarray")
                old.zfile.blktab = staging.blktab
            del root[STAGING][token]

        _commit_retrying(tm, install)
    except BaseException:
        try:
            _commit_retrying(tm, lambda: conn.root()[STAGING].pop(token, None))
        except Exception:
            pass  # the error that matters is the one being raised; drop_staging cleans up
        raise


def drop_staging(uri: str, older_than: float = 24 * 3600) -> List[str]:
    """Remove staging files that to_zbigarray calls killed before their end
    left behind, if older than `older_than` seconds (younger ones may
    belong to calls still running); their keys."""
    from persistent.TimeStamp import TimeStamp

    tm, conn = _connection(uri, None)

    def drop() -> List[str]:
        tab = conn.root().get(STAGING)
        if tab is None:
            return []
        now = time.time()
        old = [k for k, z in tab.items() if now - TimeStamp(z._p_serial).timeTime() > older_than]
        for k in old:
            del tab[k]
        return old

    dropped: List[str] = _commit_retrying(tm, drop)
    return dropped
