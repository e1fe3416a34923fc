"""BigFile stored in ZODB (the API and persistent state of wendelin.core's
``wendelin.bigfile.file_zodb``; its databases load through
``bigfile.compat.class_factory``, as ZODB records name the module).

``ZBigFile(blksize)`` is a persistent object whose blocks live in the
database as ordinary ZODB objects (no blobs): ``blktab`` maps a block number
to a ZBlk object holding that block's bytes, in one of two formats:

- ``ZBlk0``: the whole block as one object (trailing zeros stripped). One
  load per block read; any change rewrites the block.
- ``ZBlk1``: the block cut into ``ZBlk1.CHUNKSIZE``-byte chunks, each a
  ``ZData`` object in an ``IOBTree`` (all-zero chunks are not stored). A
  change rewrites only the chunks it touched; a read loads every chunk.

Which format a changed block is written in is chosen per block at commit by
the file's ``zblk_fmt`` (``ZBigFile(blksize, zblk_fmt="")``, as in
wendelin.core 2.x) or, when that is "", by the module's
``ZBlk_fmt_write``: "ZBlk0", "ZBlk1" or "auto" (the default; the
environment variable ``WENDELIN_CORE_ZBLK_FMT`` sets it at import, as in
wendelin.core). "auto" writes a block as ZBlk1 when the change is small
(fewer than half of its chunks differ from what is stored) or when the block
is new and only partly filled (the tail of an append, which the next
appends will extend), and as ZBlk0 otherwise (a full new block, a big
rewrite, a block an append has moved past: the previous end of the file is
rewritten as ZBlk0 when an append creates the block after it). See the
package README for the rules in full and the measured costs.

``zfile.fileh_open()`` returns a ``ZBigFileH`` tied to the ZODB connection
of `zfile` (it must be in a connection: added with ``conn.add`` or reached
from a committed root). A handle the program drops is collected like any
object once it has no live mapping and no uncommitted change (the ZBigFile
holds it until then). Its changes are part of that connection's
transactions:

- ``transaction.commit()`` stores the dirty pages into ZBlk objects in the
  first phase of the two-phase commit (before the connection's own
  objects are written, so they go into the same database transaction) and
  marks them stored in ``tpc_finish``. If the commit fails (a
  ``ConflictError``, a storage error), the database is unchanged, the
  changed objects are reverted by ZODB, and the pages stay dirty in memory:
  the application can still read them. ZODB then requires the transaction
  to be aborted; ``transaction.abort()`` drops the changes, after which the
  work can be redone (``transaction.manager.attempts()``), unless
  ``fh.carry_changes()`` was called before it: then the changes stay for
  the next transaction to commit again, except that blocks another
  transaction changed meanwhile raise ConflictError (never a lost update).
- ``transaction.abort()`` drops the dirty pages.
- When another connection (in this process or another, through ZEO)
  commits changes to blocks of the file, this handle's pages of those
  blocks are dropped when this connection moves to its next transaction,
  right after ZODB's own invalidations: a transaction never sees a mix of
  two database states.

Two handles writing the same block concurrently: the second commit gets
ZODB's ``ConflictError`` (ZBlk objects do not resolve conflicts); two
handles writing different blocks commit both.

Deliberate differences from wendelin.core: "auto" is the default format
(our invalidation also covers blocks whose ZBlk is replaced or created by
another connection, which wendelin.core's local-cache mode misses); a
failed commit keeps the changes in memory until the transaction is aborted,
or longer with ``carry_changes`` (wendelin.core drops them at once);
ZBlk1 chunks are 16 KiB (4 KiB there); ``ZBigFileH`` refuses
``dirty_writeout``/``dirty_discard`` (use the transaction); ``fileh_open``
takes the RAM, budget and fault backend arguments of ``BigFile.fileh_open``.
"""

import functools
import contextlib
import os
import threading
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

from BTrees.IOBTree import IOBTree
from BTrees.LOBTree import LOBTree
from persistent import Persistent
from transaction.interfaces import IDataManager, ISynchronizer
from ZODB.POSException import ConflictError
from zope.interface import implementer

from bigfile._bigfile import WRITEOUT_MARKSTORED, WRITEOUT_STORE, BigFile, _keep_heap_top

__all__ = ["ZBigFile", "ZBigFileH", "ZBlk0", "ZBlk1", "ZData", "ZBlk_fmt_write", "ZBlk_fmt_registry"]

_zeros: Dict[int, bytes] = {}
_nolock = contextlib.nullcontext()


def _zero_bytes(n: int) -> bytes:
    z = _zeros.get(n)
    if z is None:
        z = _zeros[n] = bytes(n)
    return z


def _fill(buf: memoryview, data: Any) -> None:
    """Copy `data` to the start of `buf` and zero the rest (a block buffer
    may come from a reused page)."""
    n = len(data)
    buf[:n] = data
    if n < len(buf):
        buf[n:] = memoryview(_zero_bytes(len(buf)))[: len(buf) - n]


# ~~~ block formats (pickled by class name: never rename or change their state)


class ZBlkBase(Persistent):  # type: ignore[misc]  # persistent has no type hints
    """One block's data in the database. An invalidation by ZODB is passed
    to the ZBigFiles with handles in the object's connection, which know
    (by identity, as a ghost keeps no attributes) which block it holds."""

    def loadblkdata(self, deactivate: bool = True) -> Any:
        """The block's bytes (trailing zeros may be missing); with
        `deactivate`, the objects read are turned back into ghosts (the
        page keeps the data)."""
        raise NotImplementedError

    def setblkdata(self, data: bytes) -> bool:
        """Set the block's bytes (trailing zeros stripped); return whether
        anything changed."""
        raise NotImplementedError

    def _retire(self) -> None:
        """This ZBlk is being replaced in ``blktab`` by another object (a
        format change, a consolidation): write it too, in the same
        transaction, as it is no longer read. Every change of a block in
        place writes its ZBlk, so a transaction that changes this one
        concurrently conflicts with the replacement whichever of the two
        commits first. (A read dependency, ``readCurrent``, protects only
        the replacement: an in-place change committed after it would land
        in an object that ``blktab`` no longer names, and be lost.)"""
        raise NotImplementedError

    def _p_invalidate(self) -> None:
        jar = self._p_jar
        Persistent._p_invalidate(self)
        # Only invalidations for other transactions' commits, which ZODB
        # applies in newTransaction; outside it the connection is reverting
        # our own changes (abort), whose pages are dirty and dropped anyway.
        if getattr(jar, "_bigfile_syncing", False):
            for zfile in jar._bigfile_zfiles:
                zfile._zblk_invalidated(self)


class ZBlk0(ZBlkBase):
    """A whole block as one object: its bytes, trailing zeros stripped."""

    _blkdata: bytes = b""

    def __getstate__(self) -> bytes:
        return self._blkdata

    def __setstate__(self, state: bytes) -> None:
        self._blkdata = state

    def loadblkdata(self, deactivate: bool = True) -> bytes:
        data = self._blkdata
        if deactivate:
            # The page holds the data from now on: no second copy here.
            self._p_deactivate()
        return data

    def setblkdata(self, data: bytes) -> bool:
        self._blkdata = data
        return True

    def _retire(self) -> None:
        # Loaded first (by the attribute write), so the write carries the
        # serial of our snapshot; the data is dropped, nobody reads it.
        self._blkdata = b""


class ZData(Persistent):  # type: ignore[misc]
    """One chunk of a ZBlk1 block."""

    data: bytes = b""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def __getstate__(self) -> bytes:
        return self.data

    def __setstate__(self, state: bytes) -> None:
        self.data = state


class ZBlk1(ZBlkBase):
    """A block cut into chunks: ``chunktab`` maps a chunk's offset to a
    ZData of its bytes (trailing zeros stripped; all-zero chunks absent).
    Readers take chunks as stored, so CHUNKSIZE may change between
    versions; a writer finding other sizes rewrites the block's chunks."""

    CHUNKSIZE = 16384  # see the README for 4, 16 and 64 KiB measured

    chunktab: IOBTree

    def __init__(self) -> None:
        self.chunktab = IOBTree()

    def __getstate__(self) -> IOBTree:
        return self.chunktab

    def __setstate__(self, state: IOBTree) -> None:
        self.chunktab = state

    def loadblkdata(self, deactivate: bool = True) -> bytearray:
        tab = self.chunktab
        if not tab:
            return bytearray()
        jar = self._p_jar
        if jar is not None:
            # One round trip to a ZEO server for all the chunks, not one each.
            jar.prefetch(tab.values())
        last = tab.maxKey()
        out = bytearray(last + len(tab[last].data))
        for off, chunk in tab.items():
            d = chunk.data
            out[off : off + len(d)] = d
            if deactivate:
                chunk._p_deactivate()
        return out

    def setblkdata(self, data: bytes) -> bool:
        tab, cs = self.chunktab, self.CHUNKSIZE
        changed = False
        if any(off % cs or len(ch.data) > cs for off, ch in tab.items()):
            tab.clear()
            changed = True
        view = memoryview(data)
        end = len(data)
        for off in range(0, max(end, (tab.maxKey() + 1) if tab else 0), cs):
            piece = bytes(view[off : off + cs]).rstrip(b"\0")
            chunk = tab.get(off)
            if not piece:
                if chunk is not None:
                    del tab[off]
                    changed = True
            elif chunk is None:
                tab[off] = ZData(piece)
                changed = True
            elif chunk.data != piece:
                chunk.data = piece
                changed = True
            else:
                chunk._p_deactivate()
        return changed

    def _retire(self) -> None:
        # Written as it is (its state is a reference to its chunks): loaded
        # first, so the write carries the serial of our snapshot.
        self._p_activate()
        self._p_changed = True


def _count_changed(old: Any, new: bytes, cs: int) -> int:
    """How many `cs`-byte chunks differ between two blocks' bytes, both
    zero-padded to the block size (trailing zeros are not stored, so a
    chunk present on one side only may be all zeros)."""
    n = 0
    end = max(len(old), len(new))
    ov, nv = memoryview(old), memoryview(new)
    for off in range(0, end, cs):
        o, w = ov[off : off + cs], nv[off : off + cs]
        if o != w and bytes(o).rstrip(b"\0") != bytes(w).rstrip(b"\0"):
            n += 1
    return n


ZBlk = ZBlk0  # the name early wendelin.core versions wrote ZBlk0 under

_ZBlk_auto = "auto"
ZBlk_fmt_registry: Dict[str, Any] = {"ZBlk0": ZBlk0, "ZBlk1": ZBlk1, "auto": _ZBlk_auto}

#: Format of blocks written from now on: "ZBlk0", "ZBlk1" or "auto".
ZBlk_fmt_write = os.environ.get("WENDELIN_CORE_ZBLK_FMT", "auto")
if ZBlk_fmt_write not in ZBlk_fmt_registry:
    raise RuntimeError(f"WENDELIN_CORE_ZBLK_FMT={ZBlk_fmt_write!r}: unknown ZBlk format (ZBlk0, ZBlk1 or auto)")


# ~~~ the file


class _ZBigFile(BigFile):
    """The BigFile of a ZBigFile: loads and stores blocks through the ZODB
    connection of its ZBigFile (a native BigFile cannot also be a
    Persistent: both are C types with conflicting layouts)."""

    _zfile_ref: "weakref.ref[ZBigFile]"

    def __new__(cls, zfile: "ZBigFile", blksize: int) -> "_ZBigFile":
        obj = BigFile.__new__(cls, blksize)
        obj._zfile_ref = weakref.ref(zfile)
        return obj

    def _zfile(self) -> "ZBigFile":
        zfile = self._zfile_ref()
        if zfile is None:
            raise RuntimeError("the ZBigFile of this handle is gone")
        return zfile

    def loadblk(self, blk: int, buf: memoryview) -> None:
        zfile = self._zfile()
        _refuse_in_forked_child(zfile)
        zfile._loadblk(blk, buf)

    def storeblk(self, blk: int, buf: memoryview) -> None:
        zfile = self._zfile()
        _refuse_in_forked_child(zfile)
        zfile._storeblk(blk, buf)


def _refuse_in_forked_child(zfile: "ZBigFile") -> None:
    """ZODB and ZEO connections are not fork-safe (a child shares the
    parent's socket, file offsets and caches): a ZBigFile whose connection
    was opened for a handle in another process (the parent of a fork) must
    neither load nor store here; a clear error rather than a hang or
    another process's data."""
    jar = zfile._p_jar
    pid = jar.__dict__.get("_bigfile_pid") if jar is not None else None
    if pid is not None and pid != os.getpid():
        raise RuntimeError(
            f"ZBigFile used in process {os.getpid()}, a forked child of process {pid} which "
            "opened its ZODB connection; ZODB connections are not fork-safe: use the "
            "multiprocessing start method 'spawn' or 'forkserver', or open the database "
            "again in the child"
        )


def _never_ghost(self: Any) -> None:
    """`_p_deactivate` of objects whose runtime state must outlive cache
    garbage collection (their persistent state is small)."""


def _invalidate_keeping_volatiles(self: Any) -> None:
    """`_p_invalidate` that reloads the persistent state but keeps the `_v_`
    attributes (open handles, caches), which ZODB would otherwise drop."""
    keep = {k: v for k, v in self.__dict__.items() if k.startswith("_v_")}
    Persistent._p_invalidate(self)
    for k, v in keep.items():
        setattr(self, k, v)


class ZBigFile(Persistent):  # type: ignore[misc]
    """A file of `blksize`-byte blocks stored in ZODB; see the module docs.
    State, as in wendelin.core 2.x: ``(blksize, blktab, zblk_fmt)``, where
    ``blktab`` is an LOBTree block -> ZBlk and ``zblk_fmt`` the format this
    file's blocks are written in ("ZBlk0", "ZBlk1", "auto"; "" for the
    module's ``ZBlk_fmt_write``). The state ``(blksize, blktab)`` of older
    versions is read as ``zblk_fmt=""``."""

    blksize: int
    blktab: LOBTree
    zblk_fmt: str = ""

    def __init__(self, blksize: int, zblk_fmt: str = "") -> None:
        if not isinstance(blksize, int) or isinstance(blksize, bool) or blksize <= 0:
            raise ValueError(f"blksize must be a positive int, not {blksize!r}")
        if zblk_fmt != "" and zblk_fmt not in ZBlk_fmt_registry:
            raise ValueError(f"zblk_fmt {zblk_fmt!r}: unknown ZBlk format (\"\", ZBlk0, ZBlk1 or auto)")
        self.__setstate__((blksize, LOBTree(), zblk_fmt))
        self._runtime()  # checks blksize against the page size now

    def __getstate__(self) -> Any:
        return (self.blksize, self.blktab, self.zblk_fmt)

    def __setstate__(self, state: Any) -> None:
        if len(state) == 2:  # written by versions without zblk_fmt
            self.blksize, self.blktab = state
            self.zblk_fmt = ""
        else:
            self.blksize, self.blktab, self.zblk_fmt = state

    # Runtime state lives in _v_ attributes, which ZODB drops when an
    # object becomes a ghost: this object never does (its state is two
    # references), and an invalidation reloads it keeping them.
    _p_deactivate = _never_ghost
    _p_invalidate = _invalidate_keeping_volatiles

    def _runtime(self) -> _ZBigFile:
        f = self.__dict__.get("_v_file")
        if f is None:
            f = self._v_file = _ZBigFile(self, self.blksize)
            # Open handles, held weakly: a handle the program dropped goes
            # like any object. But one with live mappings or dirty pages
            # must stay joined to the transactions even if the program kept
            # only arrays over its memory: it is also held in _v_filehpinned
            # from its first mapping until it has neither (ZBigFileH._pin).
            self._v_filehset: "weakref.WeakSet[ZBigFileH]" = weakref.WeakSet()
            self._v_filehpinned: Set[ZBigFileH] = set()
            # block -> the ZBlk (None: a hole) its pages were loaded from
            self._v_loaded: Dict[int, Optional[ZBlkBase]] = {}
            self._v_blkof: Dict[int, int] = {}  # id(ZBlk in _v_loaded) -> block
            # blocks whose ZBlk ZODB invalidated since the last sync
            self._v_invalidated: Set[int] = set()
            # ZBlks written by the commit in progress, made ghosts after it
            # (they hold copies of the blocks)
            self._v_stored: List[Tuple[int, ZBlkBase]] = []
            # the blocks the commit in progress writes (for the heuristic)
            self._v_storing: Set[int] = set()
        return f

    # ~~~ block I/O, called by virtmem (loadblk inside a page fault)

    def _loadblk(self, blk: int, buf: memoryview) -> None:
        # Threads faulting at once (numpy or BLAS threads) take turns with
        # the connection, which is not thread-safe (a ZEO load lets another
        # thread run while it waits for the server).
        with getattr(self._p_jar, "_bigfile_lock", None) or _nolock:
            zblk = self.blktab.get(blk)
            self._record(blk, zblk)
            if zblk is None:
                data: Any = b""
            else:
                data = zblk.loadblkdata()
        if len(data) > len(buf):
            raise ValueError(f"ZBigFile block {blk}: {len(data)} bytes stored, more than blksize {len(buf)}")
        _fill(buf, data)

    def _storeblk(self, blk: int, buf: memoryview) -> None:
        jar = self._p_jar
        if jar is not None and self._p_oid is not None:
            # The blocks are written into the block table of this snapshot:
            # if another transaction replaced the table meanwhile
            # (bigfile.dask.to_zbigarray), this commit must fail, not write
            # into a table nobody reads any more.
            jar.readCurrent(self)
        data = bytes(buf).rstrip(b"\0")
        zblk = self.blktab.get(blk)
        fmt = ZBlk_fmt_registry[self.zblk_fmt or ZBlk_fmt_write]
        if fmt is _ZBlk_auto:
            fmt = self._zblk_fmt_heuristic(blk, zblk, data)
            if zblk is None:
                self._consolidate_before(blk)
        self._setzblk(blk, zblk, fmt, data)

    def _setzblk(self, blk: int, zblk: Optional[ZBlkBase], fmt: Any, data: bytes) -> None:
        if zblk is None or type(zblk) is not fmt:
            if zblk is not None:
                zblk._retire()
            zblk = fmt()
            self.blktab[blk] = zblk
            zblk.setblkdata(data)
        elif zblk.setblkdata(data):
            # A ZBlk1 whose chunks changed is marked changed too: readers
            # learn of the change through the ZBlk's invalidation.
            zblk._p_changed = True
        # Recorded as the page's source once committed (tpc_finish).
        self._v_stored.append((blk, zblk))

    def _consolidate_before(self, blk: int) -> None:
        """An append reached the new block `blk`: rewrite the block before it,
        the previous end of the file, as ZBlk0 if it is a ZBlk1 that this
        commit does not write anyway (appends ending on a block boundary
        would leave every block chunked, slow to read)."""
        prev = blk - 1
        if prev < 0 or prev in self._v_storing or not self.blktab or self.blktab.maxKey() != prev:
            return
        zprev = self.blktab[prev]
        if type(zprev) is ZBlk1:
            self._setzblk(prev, zprev, ZBlk0, bytes(zprev.loadblkdata()))

    def _zblk_fmt_heuristic(self, blk: int, zblk: Optional[ZBlkBase], data: bytes) -> Any:
        """The format to write block `blk` in, now holding `data` (see the
        module docs): ZBlk1 where the change is small or the block is the
        growing tail of an append, ZBlk0 where it is new and full, changed
        in large part, or an append has just moved past it (it is complete
        and will be read far more often than written again)."""
        cs = ZBlk1.CHUNKSIZE
        nchunks = -(-self.blksize // cs)
        # The next block is written by the same commit.
        passed = blk + 1 in self._v_storing
        if zblk is None:
            return ZBlk0 if passed or len(data) == self.blksize else ZBlk1
        old = zblk.loadblkdata(deactivate=False)  # setblkdata compares with it next
        if passed and memoryview(data)[: len(old)] == memoryview(old):
            return ZBlk0
        small = _count_changed(old, data, cs) * 2 < nchunks
        return ZBlk1 if small else ZBlk0

    # ~~~ invalidation

    def _record(self, blk: int, zblk: Optional[ZBlkBase]) -> None:
        """Pages of `blk` now hold the data of `zblk` (None: a hole)."""
        self._forget(blk)
        self._v_loaded[blk] = zblk
        if zblk is not None:
            self._v_blkof[id(zblk)] = blk

    def _forget(self, blk: int) -> None:
        old = self._v_loaded.pop(blk, None)
        if old is not None:
            self._v_blkof.pop(id(old), None)

    def _zblk_invalidated(self, zblk: ZBlkBase) -> None:
        blk = self.__dict__.get("_v_blkof", {}).get(id(zblk))
        if blk is not None and self._v_loaded.get(blk) is zblk:
            self._v_invalidated.add(blk)

    def _sync_invalidations(self) -> None:
        """After ZODB applied the invalidations of a new transaction: drop
        the pages of blocks whose ZBlk changed, or whose blktab entry now
        names another ZBlk (created, replaced, removed by another
        connection). Dirty pages are kept (a failed commit's changes,
        dropped by the abort that must follow)."""
        if "_v_file" not in self.__dict__:
            return
        stale = self._v_invalidated
        self._v_invalidated = set()
        tab = self.blktab
        loaded = self._v_loaded
        for blk, zblk in list(loaded.items()):
            if blk in stale or tab.get(blk) is not zblk:
                stale.add(blk)
        filehs = [fh for fh in list(self._v_filehset) if not fh.closed]
        for blk in stale:
            keep = False
            for fh in filehs:
                if fh.page_state(blk) == "dirty":
                    keep = True
                    fh._stale_dirty.add(blk)
                else:
                    fh._zfileh.invalidate_page(blk)
            if not keep:
                self._forget(blk)
        # Forget blocks no handle holds any more (reclaimed), so that the
        # record stays as small as what is resident.
        if len(loaded) > 64 and len(loaded) > 2 * sum(fh.stats()["resident_pages"] for fh in filehs):
            for blk in list(loaded):
                if all(fh.page_state(blk) is None for fh in filehs):
                    self._forget(blk)

    # ~~~ handles

    def fileh_open(
        self,
        ram: Any = None,
        budget: Optional[int] = None,
        *,
        fault_backend: Optional[str] = None,
        _use_wcfs: Optional[bool] = None,
    ) -> "ZBigFileH":
        """A handle whose changes go with the transactions of this object's
        ZODB connection (``ram``/``budget``/``fault_backend`` as for
        ``BigFile.fileh_open``).
        `_use_wcfs` is accepted for wendelin.core's callers: there is no
        WCFS mode, so only None and False are valid."""
        if _use_wcfs:
            raise NotImplementedError("ZBigFile.fileh_open: there is no WCFS (shared-cache) mode in bigfile")
        conn = self._p_jar
        if conn is None:
            raise ValueError(
                "ZBigFile.fileh_open: the ZBigFile is not in a ZODB connection; "
                "add it first (conn.add(zfile) or store it under the root and commit)"
            )
        fileh = ZBigFileH(self, conn, ram, budget, fault_backend)
        self._v_filehset.add(fileh)
        return fileh


# ~~~ connection hook


def _connection_zfiles(conn: Any) -> "weakref.WeakSet[ZBigFile]":
    """The ZBigFiles with open handles in `conn`, synchronized right after
    the connection applies ZODB's invalidations: its ``newTransaction``
    (called by the transaction manager at ``begin``, by ``afterCompletion``
    and at ``open``) is wrapped on the instance."""
    zfiles: "Optional[weakref.WeakSet[ZBigFile]]" = conn.__dict__.get("_bigfile_zfiles")
    if zfiles is None:
        zfiles = weakref.WeakSet()
        conn._bigfile_lock = threading.RLock()
        orig = conn.newTransaction

        def newTransaction(transaction: Any, sync: bool = True) -> None:
            conn._bigfile_syncing = True
            try:
                orig(transaction, sync)
            finally:
                conn._bigfile_syncing = False
            for zfile in list(zfiles):
                for fh in list(zfile._v_filehset):
                    fh._follow_transaction_manager()
                zfile._sync_invalidations()
                # Committed or aborted by now: handles without mappings go.
                for fh in list(zfile._v_filehpinned):
                    fh._unpin_if_unused()

        conn.newTransaction = newTransaction
        conn._bigfile_zfiles = zfiles
    return zfiles


def _make_join(conn: Any, zfile: ZBigFile, txn: Any) -> None:
    """Make `conn` join `txn` now (our commit, which runs before the
    connection's, changes its objects, and a connection cannot join a
    transaction once its commit runs), by registering the unchanged `zfile`
    once. Never an object ZODB already has registered: a registered object
    is stored once per registration, and two records of one object in one
    transaction corrupt ZEO client caches. A changed `zfile` is registered
    already; so is one registered by another handle of this transaction.
    Nothing changes the ZBigFile after the commit has begun (it writes
    ZBlks and blktab only), so it is not registered a second time by
    being changed after this."""
    if zfile._p_oid is None or zfile._p_jar is not conn:
        return
    zfile._p_activate()  # a ghost after an invalidation: registered unloaded, it would not be "unchanged"
    if zfile._p_changed:
        return
    if conn.__dict__.get("_bigfile_joined") is txn:
        return
    conn._bigfile_joined = txn
    conn.register(zfile)


def _on_connection_close(ref: "weakref.ref[Any]") -> None:
    """The close callback of a connection with handles: one per connection
    (ZODB keeps callbacks until the close, so one per handle would pile up
    with every handle opened meanwhile)."""
    conn = ref()
    if conn is None:
        return
    conn._bigfile_close_cb = False
    for zfile in list(conn._bigfile_zfiles):
        for fileh in list(zfile._v_filehset):
            if fileh._conn is conn:
                fileh._on_connection_close()


def _mapping_gone(ref: "weakref.ref[ZBigFileH]", _vma_ref: Any) -> None:
    fileh = ref()
    if fileh is not None:
        fileh._maps.discard(_vma_ref)
        fileh._unpin_if_unused()


@implementer(IDataManager, ISynchronizer)
class ZBigFileH:
    """A handle of a ZBigFile whose changes are committed and aborted with
    the transactions of the file's ZODB connection (wendelin.core's
    ``_ZBigFileH``): a transaction data manager and synchronizer. Mapping
    methods are those of ``BigFileH``."""

    def __init__(
        self, zfile: ZBigFile, conn: Any, ram: Any, budget: Optional[int], fault_backend: Optional[str] = None
    ) -> None:
        self.zfile = zfile
        self._conn = conn
        # The process using the connection for a handle: its forked
        # children may not (`_refuse_in_forked_child`).
        conn.__dict__.setdefault("_bigfile_pid", os.getpid())
        self._zfileh = zfile._runtime().fileh_open(ram=ram, budget=budget, fault_backend=fault_backend)
        # A load allocates three block-sized objects at once (the record
        # and the unpickled state among them), then frees them: without this the
        # C heap gave that memory back to the kernel after every load, and
        # the next touched fresh pages (heap.rs).
        _keep_heap_top(3 * zfile.blksize + (1 << 20))
        self._joined: Any = None  # the transaction we joined
        self._committing: Any = None  # the transaction in two-phase commit
        self._failed: Any = None  # the transaction whose commit failed, not yet aborted
        self._carry: Any = None  # that transaction, if its abort keeps the changes
        # dirty blocks changed by another transaction since (found when
        # changes are kept over a failed commit): never to be committed
        self._stale_dirty: Set[int] = set()
        self.transaction_manager: Any = None
        # weak references to the mappings made through this handle (their
        # callbacks unpin it when the last goes)
        self._maps: Set[Any] = set()
        # the connection was closed since we last followed it
        self._conn_was_closed = False
        _connection_zfiles(conn).add(zfile)
        self._follow_transaction_manager()

    def _follow_transaction_manager(self) -> None:
        if self._zfileh.closed:
            return
        conn = self._conn
        tm = conn.transaction_manager if conn.opened else None
        # ZODB runs and forgets close callbacks at each close.
        if tm is not None and not conn.__dict__.get("_bigfile_close_cb"):
            conn.onCloseCallback(functools.partial(_on_connection_close, weakref.ref(conn)))
            conn._bigfile_close_cb = True
        if tm is self.transaction_manager:
            return
        if self.transaction_manager is not None:
            self.transaction_manager.unregisterSynch(self)
        self.transaction_manager = tm
        if tm is not None:
            if self._conn_was_closed:
                # Pages written through mappings kept while the connection
                # was closed are not this user's transaction's to commit.
                self._conn_was_closed = False
                self._drop_uncommitted()
            tm.registerSynch(self)

    def _on_connection_close(self) -> None:
        self._conn_was_closed = True
        if self.transaction_manager is not None:
            self.transaction_manager.unregisterSynch(self)
            self.transaction_manager = None
        # Uncommitted changes end with the connection, as those of its ZODB
        # objects do: the pool would hand them to the connection's next user,
        # whose commit would store them.
        self._drop_uncommitted()
        # A reopened connection calls newTransaction, which re-registers us.

    def _drop_uncommitted(self) -> None:
        self._joined = self._failed = self._carry = None
        self._stale_dirty.clear()
        if not self._zfileh.closed and self._zfileh.isdirty():
            self._zfileh.dirty_discard()

    # ~~~ BigFileH

    def mmap(self, pgoffset: int, pglen: int) -> Any:
        return self._pin(self._zfileh.mmap(pgoffset, pglen))

    def mmap_cached(self, pgoffset: int, pglen: int) -> Any:
        return self._pin(self._zfileh.mmap_cached(pgoffset, pglen))

    def _pin(self, vma: Any) -> Any:
        """Hold this handle in its ZBigFile while `vma` lives: its pages
        may be written through it, and their changes must reach the
        transaction even if the program dropped the handle itself."""
        self._maps.add(weakref.ref(vma, functools.partial(_mapping_gone, weakref.ref(self))))
        self.zfile._v_filehpinned.add(self)
        return vma

    def _unpin_if_unused(self) -> None:
        """Let the ZBigFile hold this handle weakly again once it has no
        live mapping and no dirty page (mappings kept in the handle's
        ``mmap_cached`` cache do not count: no one else can write through
        them)."""
        if not self._zfileh.closed:
            # (a copy: callbacks of mappings freed meanwhile change the set)
            if self._zfileh.isdirty() or any(not getattr(r(), "closed", True) for r in list(self._maps)):
                return
        self.zfile._v_filehpinned.discard(self)

    def uses_mmap_overlay(self) -> bool:
        """Whether clean pages come from a base-layer mapping of the file
        (wendelin.core 2.x with WCFS): never here, see BigFileH."""
        return self._zfileh.uses_mmap_overlay()

    def release_cached(self) -> None:
        self._zfileh.release_cached()

    def isdirty(self) -> bool:
        return self._zfileh.isdirty()

    def dirty_blocks(self) -> Any:
        return self._zfileh.dirty_blocks()

    def invalidate_page(self, pgoffset: int) -> None:
        self._zfileh.invalidate_page(pgoffset)

    def page_state(self, pgoffset: int) -> Any:
        return self._zfileh.page_state(pgoffset)

    def stats(self) -> Any:
        return self._zfileh.stats()

    def ram_stats(self) -> Any:
        return self._zfileh.ram_stats()

    def set_load_policy(self, attempts: int, backoff: float = 0.001) -> None:
        self._zfileh.set_load_policy(attempts, backoff)

    @property
    def blksize(self) -> int:
        return self._zfileh.blksize

    @property
    def closed(self) -> bool:
        return self._zfileh.closed

    def dirty_writeout(self, flags: int) -> None:
        raise TypeError("ZBigFileH: changes are stored by transaction.commit(), not dirty_writeout")

    def dirty_discard(self) -> None:
        raise TypeError("ZBigFileH: changes are dropped by transaction.abort(), not dirty_discard")

    def close(self) -> None:
        """Close the handle (its mappings must be gone); uncommitted changes are dropped."""
        if self._zfileh.closed:
            return
        if self._committing is not None:
            raise RuntimeError("ZBigFileH.close: a commit of this handle is in progress")
        # Closing drops the dirty pages; a close refused (live mappings)
        # changes nothing, so no discard before it.
        self._zfileh.close()
        if self.transaction_manager is not None:
            self.transaction_manager.unregisterSynch(self)
            self.transaction_manager = None
        self.zfile._v_filehset.discard(self)
        self.zfile._v_filehpinned.discard(self)

    def __enter__(self) -> "ZBigFileH":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ~~~ ISynchronizer

    def beforeCompletion(self, txn: Any) -> None:
        # Pages are written without telling anyone: join the transaction
        # when it ends, if there is anything to commit or abort. The
        # connection must join now too (it cannot once commit runs, and our
        # commit changes its objects): registering the unchanged ZBigFile
        # does that without writing it.
        if self._zfileh.closed or not self._conn.opened or self._joined is txn or not self._zfileh.isdirty():
            return
        if txn.status not in ("Active", "Doomed"):  # transaction's Status values
            return
        txn.join(self)
        self._joined = txn
        _make_join(self._conn, self.zfile, txn)

    def afterCompletion(self, txn: Any) -> None:
        # After a commit the connection marked the ZBlks we wrote saved:
        # drop their copies of the blocks (the pages hold the data). After
        # an abort ZODB has already reverted them.
        stored, self.zfile._v_stored = self.zfile.__dict__.get("_v_stored", []), []
        for _blk, zblk in stored:
            if zblk._p_jar is not None and not zblk._p_changed:
                if isinstance(zblk, ZBlk1):
                    for chunk in zblk.chunktab.values():
                        chunk._p_deactivate()
                zblk._p_deactivate()

    def newTransaction(self, txn: Any) -> None:
        pass

    # ~~~ IDataManager

    def sortKey(self) -> str:
        # Before our connection: our commit changes its objects.
        return "\0bigfile " + str(self._conn.sortKey())

    def abort(self, txn: Any) -> None:
        self._joined = None
        if self._committing is txn:
            # A commit failing before we voted: tpc_abort follows and keeps
            # the changes until the transaction itself is aborted.
            return
        self._failed = None
        if self._carry is txn:
            self._carry = None
            return
        self._stale_dirty.clear()
        if not self._zfileh.closed:
            self._zfileh.dirty_discard()

    def tpc_begin(self, txn: Any) -> None:
        self._committing = txn

    def commit(self, txn: Any) -> None:
        if self._zfileh.closed:
            return
        if self.zfile._p_jar is not self._conn:
            # An aborted conn.add() takes the object out of the connection:
            # nothing would store the blocks.
            raise ValueError(
                "ZBigFileH: its ZBigFile is no longer in the handle's ZODB connection (was the transaction "
                "that added it aborted?); abort, add the ZBigFile again and open a new handle"
            )
        stale = self._stale_dirty.intersection(self._zfileh.dirty_blocks())
        if stale:
            raise ConflictError(
                f"ZBigFile blocks {sorted(stale)} were changed by another transaction after this "
                "handle's changes to them were made (changes carried over a failed commit): "
                "abort, and redo the work on the current data"
            )
        # Dirty pages -> ZBlk objects of the connection, which writes them
        # in its own commit (it sorts after us).
        self.zfile._v_storing = set(self._zfileh.dirty_blocks())
        self._zfileh.dirty_writeout(WRITEOUT_STORE)

    def tpc_vote(self, txn: Any) -> None:
        pass

    def tpc_finish(self, txn: Any) -> None:
        self._committing = None
        self._joined = None
        if self._zfileh.closed:
            return
        self._zfileh.dirty_writeout(WRITEOUT_MARKSTORED)
        self._stale_dirty.clear()
        for blk, zblk in self.zfile._v_stored:
            self.zfile._record(blk, zblk)

    def tpc_abort(self, txn: Any) -> None:
        # The database is unchanged and ZODB reverts the objects our commit
        # changed: keep the pages dirty (readable) until the transaction is
        # aborted, which drops them unless carry_changes() was called.
        self._committing = None
        self._failed = txn

    def carry_changes(self) -> None:
        """After a failed commit, before the abort ZODB requires: keep this
        handle's changes through that abort, so the next transaction can
        commit them again (after a transient storage error, say).

        Blocks that another transaction changed since (the usual cause of
        a ConflictError) cannot be committed that way, which would lose
        the other change: committing them raises ConflictError again, and
        only an abort (which drops all the handle's changes) gets out."""
        tm = self.transaction_manager
        if self._failed is None or tm is None or self._failed is not tm.get():
            raise RuntimeError(
                "ZBigFileH.carry_changes: only after a commit of this handle failed, before the transaction is aborted"
            )
        self._carry = self._failed

    def __repr__(self) -> str:
        return f"<ZBigFileH of {self.zfile!r}>"


_ZBigFileH = ZBigFileH  # wendelin.core's name
