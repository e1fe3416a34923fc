# The ZODB layer under concurrent transactions, with a real ZEO server.
#
#     python zodb_stress.py supervise DIR SECONDS
#
# starts runzeo on a FileStorage in DIR, creates two ZBigArrays, and runs
# writer processes (several threads each, each thread its own connection)
# doing random transactions on them: slice writes (small ones change a ZBlk1
# in place, big ones switch formats), appends (consolidating the block they
# move past), resizes and changes of the files' `zblk_fmt`; commits, aborts,
# retries after a conflict, carries changes over a failed commit. Writers
# run with different `WENDELIN_CORE_ZBLK_FMT`. Every 15-30 s one writer
# process is killed (SIGKILL), and writers sometimes kill themselves in the
# middle of a commit (before, between or after the two phases' votes and
# finishes); killed writers are replaced. A reader process records what its
# snapshots show (a checksum of each array and samples).
#
# Each transaction carries the list of its operations in its extension
# metadata, so what the storage holds says what was committed, whatever the
# clients believed. After the run the server is stopped and the
# FileStorage is checked with fstest and fsrefs; then every transaction is
# replayed, in commit order, into a numpy model of each file's bytes, and:
# after each transaction the blocks it wrote (those holding the items it
# wrote) and the shapes are compared with what the storage holds at that
# transaction (and, for files with a fixed format, the blocks' ZBlk types);
# every 25th transaction and at the end, the whole arrays are read through
# bigfile itself at that transaction; every reader snapshot is compared
# with the model at its snapshot. Before the run, the verifier itself is
# checked on transactions made for it (check_the_verifier). Prints
# "zodb stress OK: ..." and exits 0, or what differs and exits 1.

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import zlib

import numpy as np

EXT = "bigfile-stress"  # the extension key of the operations of a transaction
WRITERS = 4
THREADS = 2
WRITER_FMTS = ["auto", "auto", "ZBlk1", "ZBlk0"]  # WENDELIN_CORE_ZBLK_FMT of writer i
FILE_FMTS = ["", "", "auto", "ZBlk0", "ZBlk1"]  # values a transaction sets zblk_fmt to
# name: (dtype, row shape, blksize, cap on the major axis)
ARRAYS = {
    "A": ("uint32", (), 64 << 10, 1 << 20),
    "B": ("int16", (5,), 128 << 10, 400_000),
}
# RAM budgets: a writer's holds the dirty pages of its largest transaction
# (3 operations of up to 5 blocks; dirty pages are never reclaimed, and a
# load finding the budget full of them is a SIGBUS), the reader's is small;
# both are smaller than the arrays grow, so pages are reclaimed.
WRITER_BUDGET = 3 << 20
READER_BUDGET = 1 << 20
ZEO_CACHE = 2 << 20  # small, so the client cache evicts
KILL_EVERY = (15, 30)  # seconds between two kills of a writer process
SELF_KILL = 1 / 150  # chance that a commit kills its process midway
FULL_CHECK_EVERY = 25


def itemsize(name):
    dtype, row, _, _ = ARRAYS[name]
    return np.dtype(dtype).itemsize * int(np.prod(row, dtype=np.int64))


def values(name, shape, seed):
    """The values an operation writes: a function of its seed only."""
    v = np.random.default_rng(seed).integers(0, 1 << 15, size=shape)
    return v.astype(ARRAYS[name][0])


def crc(a):
    """CRC-32 of a C-contiguous array's bytes."""
    return zlib.crc32(memoryview(a).cast("B")) if a.size else 0


def index(spec):
    return tuple(slice(*s) for s in spec)


def item_blocks(v, base, blksize):
    """The blocks holding the items of `v`, a numpy view into the bytes
    `base`: the items' own bytes, not the whole rows they are in. A row of
    B (10 bytes) can straddle two blocks, and a write of its later columns
    leaves the block of its first ones alone: that block keeps the ZBlk an
    earlier transaction wrote, in whatever format (seen once in CI as "B
    block 0 is ZBlk0, written with format ZBlk1", a false alarm)."""
    if v.size == 0:
        return set()
    assert blksize % v.itemsize == 0  # items are aligned: none straddles a block
    off = np.int64(v.__array_interface__["data"][0] - base.__array_interface__["data"][0])
    for axis, (length, stride) in enumerate(zip(v.shape, v.strides)):
        shape = [1] * v.ndim
        shape[axis] = length
        off = off + (np.arange(length, dtype=np.int64) * stride).reshape(shape)
    return set(np.unique(off // blksize).tolist())


# ~~~ the model: each file's bytes and each array's shape


class Model:
    def __init__(self):
        self.bytes = {}  # name -> np.uint8 array: the file, as far as written
        self.shape = {}  # name -> major length
        self.fmt = {}  # name -> the file's zblk_fmt

    def create(self, name):
        _, _, blksize, cap = ARRAYS[name]
        self.bytes[name] = np.zeros(cap * itemsize(name) + blksize, np.uint8)
        self.shape[name] = 0
        self.fmt[name] = ""

    def view(self, name, n):
        dtype, row, _, _ = ARRAYS[name]
        return np.ndarray((n, *row), dtype, buffer=self.bytes[name][: n * itemsize(name)])

    def apply(self, op, data_only, errors):
        """Apply one operation; returns the blocks it wrote. With
        `data_only` (changes carried over a failed commit) the shape and
        format changes are not applied: ZODB reverted them, the pages stay."""
        kind, name = op[0], op[1]
        blksize = ARRAYS[name][2]
        if kind == "set":
            _, _, n, spec, seed = op
            v = self.view(name, n)[index(spec)]
            v[...] = values(name, v.shape, seed)
            return item_blocks(v, self.bytes[name], blksize)
        if kind == "append":
            _, _, n, count, seed = op
            if not data_only:
                if self.shape[name] != n:
                    errors.append(f"{op}: committed on shape {n}, but the shape was {self.shape[name]}")
                self.shape[name] = n + count
            row = ARRAYS[name][1]
            v = self.view(name, n + count)[n:]
            v[...] = values(name, (count, *row), seed)
            return item_blocks(v, self.bytes[name], blksize)
        if kind == "resize":
            _, _, n, new = op
            if not data_only:
                if self.shape[name] != n:
                    errors.append(f"{op}: committed on shape {n}, but the shape was {self.shape[name]}")
                self.shape[name] = new
            return set()
        if kind == "fmt":
            if not data_only:
                self.fmt[name] = op[2]
            return set()
        raise ValueError(f"unknown operation {op!r}")


# ~~~ writers


def describe(txn, ops, carried, fmt, who):
    """Put what the verifier replays into `txn`'s extension metadata."""
    txn.setExtendedInfo(EXT, json.dumps({"ops": ops, "carried": carried, "fmt": fmt, "who": who}))


def zeo_db(addr):
    import ZEO

    host, port = addr.rsplit(":", 1)
    return ZEO.DB((host, int(port)), cache_size=ZEO_CACHE, wait_timeout=60, server_sync=True)


class Killer:
    """A data manager that kills its process in one phase of a commit:
    its sort key puts it just after the bigfile handles ("\\0bigfile ...",
    before the connection) or after everything."""

    def __init__(self, rng, log):
        self.phase = rng.choice(["commit", "tpc_vote", "tpc_finish"])
        self.key = "\0bigfile \uffff" if rng.random() < 0.5 else "\uffff"
        self.log = log

    def sortKey(self):
        return self.key

    def _maybe_die(self, phase):
        if phase == self.phase:
            self.log({"event": "selfkill", "phase": phase, "key": "last" if self.key == "\uffff" else "after-bigfile"})
            os.kill(os.getpid(), signal.SIGKILL)

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        self._maybe_die("commit")

    def tpc_vote(self, txn):
        self._maybe_die("tpc_vote")

    def tpc_finish(self, txn):
        self._maybe_die("tpc_finish")

    def tpc_abort(self, txn):
        pass

    def abort(self, txn):
        pass


def random_ops(rng, arrays):
    """1-3 operations on the arrays as this transaction sees them, applied."""
    ops = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(sorted(arrays))
        a = arrays[name]
        _, row, blksize, cap = ARRAYS[name]
        n = a.shape[0]
        per_blk = blksize // itemsize(name)
        r = rng.random()
        if r < 0.6 and n > 0:
            what = rng.random()
            if what < 0.45:  # a few items: a small in-place change
                lo = rng.randrange(n)
                spec = [(lo, min(n, lo + rng.randint(1, 8)))]
            elif what < 0.7:  # up to a block, maybe crossing one
                lo = rng.randrange(n)
                spec = [(lo, min(n, lo + rng.randint(1, per_blk)))]
            elif what < 0.85:  # several blocks: big rewrites, format switches
                lo = rng.randrange(n)
                spec = [(lo, min(n, lo + rng.randint(per_blk, 4 * per_blk)))]
            else:  # strided, backwards sometimes
                step = rng.choice([2, 3, 7, -3])
                lo = rng.randrange(n)
                hi = min(n, lo + rng.randint(1, 2 * per_blk))
                spec = [(lo, hi, step)] if step > 0 else [(hi - 1, lo - 1 if lo else None, step)]
            if row:
                c0 = rng.randrange(row[0])
                spec.append((c0, row[0], rng.choice([1, 2])))
            seed = rng.getrandbits(62)
            v = a[index(spec)]
            v[...] = values(name, v.shape, seed)
            ops.append(["set", name, n, spec, seed])
        elif r < 0.8 and n < cap:
            count = min(cap - n, rng.choice([1, rng.randint(1, per_blk // 4), rng.randint(1, 2 * per_blk)]))
            seed = rng.getrandbits(62)
            a.append(values(name, (count, *row), seed))
            ops.append(["append", name, n, count, seed])
        elif r < 0.9:
            new = rng.randint(max(0, n - 2 * per_blk), min(cap, n + per_blk))
            a.resize((new, *row))
            ops.append(["resize", name, n, new])
        else:
            fmt = rng.choice(FILE_FMTS)
            a.zfile.zblk_fmt = fmt
            ops.append(["fmt", name, fmt])
    return ops


def writer_thread(db, wid, tid, seed, stop, log):
    import transaction
    from ZODB.POSException import ConflictError

    from bigfile.file_zodb import ZBlk_fmt_write

    rng = random.Random(seed)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    tm.begin()
    arrays = {}
    for name in ARRAYS:
        a = conn.root()[name]
        a.fileh_open(budget=WRITER_BUDGET)
        arrays[name] = a
    handles = [a._v_fileh for a in arrays.values()]

    def commit(ops, carried):
        txn = tm.get()
        # The format its blocks are written in: the file's, as this
        # transaction sees it (another may change it concurrently).
        fmt = {name: a.zfile.zblk_fmt or ZBlk_fmt_write for name, a in arrays.items()}
        describe(txn, ops, carried, fmt, [wid, tid])
        if rng.random() < SELF_KILL:
            txn.join(Killer(rng, log))
        tm.commit()

    work, attempts = None, 0
    while not stop.is_set():
        if work is None:
            work, attempts = rng.getrandbits(64), 0
        attempts += 1
        tm.begin()
        try:
            # The same seed on a retry: the same work, on the new state.
            ops = random_ops(random.Random(work), arrays)
        except Exception:
            log({"event": "error", "where": "ops", "tb": traceback.format_exc()})
            tm.abort()
            work = None
            continue
        if rng.random() < 0.1:
            tm.abort()
            log({"event": "abort"})
            work = None
            continue
        try:
            commit(ops, False)
            log({"event": "commit", "attempt": attempts})
            work = None
            continue
        except ConflictError:
            log({"event": "conflict"})
        except Exception:
            log({"event": "error", "where": "commit", "tb": traceback.format_exc()})
            tm.abort()
            work = None
            continue
        if attempts < 3 and rng.random() < 0.5:
            tm.abort()
            log({"event": "retry"})
            continue
        work = None
        if rng.random() < 0.5:
            # Keep the pages over the abort ZODB requires and commit them
            # again: only the data goes (ZODB reverted shapes and formats).
            try:
                for fh in handles:
                    if fh.isdirty():
                        fh.carry_changes()
                tm.abort()
                commit(ops, True)
                log({"event": "carried"})
            except ConflictError:
                log({"event": "carry-conflict"})
                tm.abort()
            except Exception:
                log({"event": "error", "where": "carry", "tb": traceback.format_exc()})
                tm.abort()
        else:
            tm.abort()
            log({"event": "give-up"})
    tm.abort()
    for fh in handles:
        fh.close()
    conn.close()


def writer(addr, wid, seed, logpath):
    db = zeo_db(addr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = open(logpath, "a", buffering=1)
    lock = threading.Lock()

    def log(rec):
        with lock:
            out.write(json.dumps(rec) + "\n")

    threads = [
        threading.Thread(target=writer_thread, args=(db, wid, t, seed * 16 + t, stop, log), daemon=True)
        for t in range(THREADS)
    ]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.2)
    db.close()


# ~~~ the reader


def snapshot_before(conn):
    """The tid bounding the connection's snapshot: it sees the transactions
    committed before it. (ZODB keeps it in its MVCC adapter.)"""
    before = conn._storage._start
    assert isinstance(before, bytes) and len(before) == 8, before
    return before


def reader(addr, logpath):
    import transaction

    db = zeo_db(addr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rng = random.Random(7)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    tm.begin()
    arrays = {}
    for name in ARRAYS:
        arrays[name] = conn.root()[name]
        arrays[name].fileh_open(budget=READER_BUDGET)
    with open(logpath, "a", buffering=1) as out:
        while not stop.is_set():
            tm.begin()
            rec = {"before": snapshot_before(conn).hex(), "arrays": {}}
            for name, a in arrays.items():
                n = a.shape[0]
                whole = a[...]
                flat = whole.reshape(-1)
                picks = [rng.randrange(len(flat)) for _ in range(8)] if len(flat) else []
                rec["arrays"][name] = {
                    "n": n,
                    "crc": crc(whole),
                    "samples": [[i, int(flat[i])] for i in picks],
                }
                del whole, flat
            tm.abort()
            out.write(json.dumps(rec) + "\n")
            time.sleep(0.05)
    for a in arrays.values():
        a._v_fileh.close()
    conn.close()
    db.close()


# ~~~ the supervisor


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_zeo(d):
    log = open(os.path.join(d, "runzeo.log"), "wb")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ZEO.runzeo", "-a", f"127.0.0.1:{port}", "-f", os.path.join(d, "data.fs")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"runzeo exited ({proc.returncode}); see {d}/runzeo.log")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("runzeo did not accept connections within 60 s")


def create_arrays(db):
    """Create the empty arrays in the root of `db` in a connection of its
    own; returns the connection and its transaction manager."""
    import transaction

    from bigfile.bigarray.array_zodb import ZBigArray

    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    for name, (dtype, row, blksize, _) in ARRAYS.items():
        root[name] = ZBigArray((0, *row), dtype, blksize=blksize)
    tm.get().setExtendedInfo(EXT, json.dumps({"create": sorted(ARRAYS)}))
    tm.commit()
    return conn, tm


def setup(addr):
    db = zeo_db(addr)
    conn, _ = create_arrays(db)
    conn.close()
    db.close()


class Proc:
    def __init__(self, args, logpath, env=None):
        self.logpath = logpath
        self.err = open(logpath + ".err", "ab")
        self.p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *args], stderr=self.err, env=env
        )
        self.killed = False


def run(d, seconds):
    zeo, addr = start_zeo(d)
    try:
        setup(addr)
        seeds = random.Random(int(os.environ.get("BIGFILE_STRESS_SEED", "0")) or None)
        writers = {}
        gen = 0
        failures = []
        kills = 0

        def spawn(wid):
            nonlocal gen
            gen += 1
            env = dict(os.environ, WENDELIN_CORE_ZBLK_FMT=WRITER_FMTS[wid % len(WRITER_FMTS)])
            log = os.path.join(d, f"writer-{wid}-{gen}.log")
            writers[wid] = Proc(["writer", addr, str(wid), str(seeds.getrandbits(40)), log], log, env)

        for wid in range(WRITERS):
            spawn(wid)
        rd = Proc(["reader", addr, os.path.join(d, "reader.log")], os.path.join(d, "reader.log"))
        t0 = time.monotonic()
        next_kill = t0 + seeds.uniform(*KILL_EVERY)
        while time.monotonic() - t0 < seconds:
            time.sleep(0.2)
            for wid, w in list(writers.items()):
                st = w.p.poll()
                if st is None:
                    continue
                if st == -signal.SIGKILL and (w.killed or last_event(w.logpath) == "selfkill"):
                    spawn(wid)
                else:
                    failures.append(f"writer {wid} ended with status {st}: {tail(w.logpath + '.err')}")
                    spawn(wid)
            if rd.p.poll() is not None:
                failures.append(f"reader ended with status {rd.p.returncode}: {tail(rd.logpath + '.err')}")
                break
            if time.monotonic() >= next_kill:
                w = writers[seeds.randrange(WRITERS)]
                w.killed = True
                w.p.kill()
                kills += 1
                next_kill = time.monotonic() + seeds.uniform(*KILL_EVERY)
        for p in [rd, *writers.values()]:
            if p.p.poll() is None:
                p.p.terminate()
        for p in [rd, *writers.values()]:
            try:
                st = p.p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.p.kill()
                failures.append(f"{p.logpath}: did not stop within 120 s of SIGTERM")
                continue
            # SIGTERM is ours; a process just started may not handle it yet.
            if st not in (0, -signal.SIGTERM) and not (
                st == -signal.SIGKILL and (p.killed or last_event(p.logpath) == "selfkill")
            ):
                failures.append(f"{p.logpath}: ended with status {st}: {tail(p.logpath + '.err')}")
    finally:
        zeo.terminate()
        try:
            zeo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            zeo.kill()
            zeo.wait()
    return failures, kills


def last_event(logpath):
    try:
        with open(logpath) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line).get("event")
        except ValueError:
            continue
    return None


def tail(path, n=3000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except FileNotFoundError:
        return "(no stderr)"


def client_counts(d):
    counts = {}
    errors = []
    for fn in sorted(os.listdir(d)):
        if not (fn.startswith("writer-") and fn.endswith(".log")):
            continue
        with open(os.path.join(d, fn)) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # the last line of a killed writer
                ev = rec["event"]
                counts[ev] = counts.get(ev, 0) + 1
                if ev == "error":
                    errors.append(f"{fn}: {rec['where']}: {rec['tb']}")
    return counts, errors


# ~~~ the verifier


def check_storage(d):
    problems = []
    fs = os.path.join(d, "data.fs")
    for script in ("fstest", "fsrefs"):
        r = subprocess.run([sys.executable, "-m", f"ZODB.scripts.{script}", fs], capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or (script == "fsrefs" and out):
            problems.append(f"{script}: status {r.returncode}: {out[-2000:]}")
    return problems


class Replay:
    """The FileStorage's transactions applied one at a time, with their own
    tids, to an in-memory storage, and a connection that moves to each
    state: loads of the current state are O(1), where a FileStorage's
    historical loads walk back through every later revision (quadratic
    over a long run). Old revisions are packed away as it goes."""

    PACK_EVERY = 200

    def __init__(self):
        from ZODB.MappingStorage import MappingStorage

        self.ms = MappingStorage()
        self.db = self.conn = None
        self.n = 0

    def apply(self, txn):
        from ZODB.utils import z64

        ms = self.ms
        ms.tpc_begin(txn, tid=txn.tid)
        oids = []
        for r in txn:
            try:
                serial = ms.load(r.oid)[1]
            except KeyError:
                serial = z64
            ms.store(r.oid, serial, r.data, "", txn)
            oids.append(r.oid)
        ms.tpc_vote(txn)
        ms.tpc_finish(txn)
        if self.db is None:
            # Only now: opening a DB on an empty storage would create a root
            # with a tid of its own, after those of the file.
            import transaction
            import ZODB

            self.db = ZODB.DB(ms, cache_size=5000)
            self.tm = transaction.TransactionManager()
            self.conn = self.db.open(self.tm)
        else:
            self.db._mvcc_storage.invalidate(txn.tid, oids)  # as a storage tells its DB
        self.n += 1
        if self.n % self.PACK_EVERY == 0:
            from ZODB.serialize import referencesf

            self.tm.abort()
            ms.pack(time.time(), referencesf)
        self.tm.begin()
        return self.conn

    def close(self):
        if self.db is not None:
            self.tm.abort()
            self.conn.close()
            self.db.close()


def verify(d):
    from ZODB.FileStorage import FileStorage

    from bigfile.file_zodb import ZBlk0, ZBlk1

    errors = []
    model = Model()
    storage = FileStorage(os.path.join(d, "data.fs"), read_only=True)
    replay = Replay()
    snaps = []
    with open(os.path.join(d, "reader.log")) as f:
        for line in f:
            try:
                snaps.append(json.loads(line))
            except ValueError:
                pass
    snaps.sort(key=lambda s: s["before"])
    si = 0
    stats = {"txns": 0, "carried": 0, "blocks": 0, "full": 0, "snapshots": 0, "ops": {}}

    def check_snapshots(upto):
        nonlocal si
        while si < len(snaps) and (upto is None or bytes.fromhex(snaps[si]["before"]) <= upto):
            s = snaps[si]
            si += 1
            stats["snapshots"] += 1
            for name, got in s["arrays"].items():
                n = model.shape[name]
                v = model.view(name, n)
                if got["n"] != n or got["crc"] != crc(v):
                    bad = [x for x in got["samples"] if got["n"] == n and int(v.reshape(-1)[x[0]]) != x[1]]
                    errors.append(f"reader snapshot before {s['before']}: {name} has {got['n']} rows, crc "
                                  f"{got['crc']:#x}; the model {n} rows (samples differing: {bad[:5]})")

    def full_check(conn, tid, label):
        """The whole arrays, read through bigfile."""
        stats["full"] += 1
        for name in ARRAYS:
            a = conn.root()[name]
            fh = a.zfile.fileh_open(budget=4 << 20)
            n = model.shape[name]
            if a.shape[0] != n:
                errors.append(f"{label} {tid.hex()}: {name} has {a.shape[0]} rows, the model {n}")
                fh.close()
                continue
            nbytes = n * itemsize(name)
            bs = a.zfile.blksize
            with fh.mmap(0, -(-nbytes // bs) or 1) as vma:
                got = np.frombuffer(vma, np.uint8)[:nbytes].copy()
            fh.close()
            want = model.bytes[name][:nbytes]
            if not np.array_equal(got, want):
                off = np.flatnonzero(got != want)
                errors.append(f"{label} {tid.hex()}: {name} differs from the model at {len(off)} bytes from"
                              f" offset {int(off[0])}")

    def check_txn(conn, txn, info, written):
        """Shapes, formats and the blocks the transaction wrote, as stored."""
        for name, blocks in written.items():
            a = conn.root()[name]
            if a.shape[0] != model.shape[name]:
                errors.append(f"txn {txn.tid.hex()} {info['who']}: {name} has {a.shape[0]} rows, the model"
                              f" {model.shape[name]}")
            zf = a.zfile
            bs = zf.blksize
            if zf.zblk_fmt != model.fmt[name]:
                errors.append(f"txn {txn.tid.hex()}: {name}.zblk_fmt {zf.zblk_fmt!r}, the model {model.fmt[name]!r}")
            fixed = {"ZBlk0": ZBlk0, "ZBlk1": ZBlk1}.get(info["fmt"][name])
            for b in sorted(blocks):
                stats["blocks"] += 1
                zblk = zf.blktab.get(b)
                data = zblk.loadblkdata() if zblk is not None else b""
                want = model.bytes[name][b * bs : (b + 1) * bs]
                got = np.zeros(bs, np.uint8)
                got[: len(data)] = np.frombuffer(bytes(data), np.uint8)
                if not np.array_equal(got, want):
                    off = np.flatnonzero(got != want)
                    errors.append(
                        f"txn {txn.tid.hex()} {info['who']} (carried={info['carried']}): {name} block {b}"
                        f" differs from the model at {len(off)} bytes from offset {int(off[0])}: a"
                        f" committed change is lost or wrong (ops {info['ops']})")
                if fixed is not None and zblk is not None and type(zblk) is not fixed:
                    errors.append(f"txn {txn.tid.hex()} {info['who']} (carried={info['carried']}): {name}"
                                  f" block {b} is {type(zblk).__name__}, written with format {fixed.__name__}"
                                  f" (ops {info['ops']})")

    it = storage.iterator()
    try:
        for txn in it:
            conn = replay.apply(txn)
            info = txn.extension.get(EXT)
            if info is None:
                continue
            info = json.loads(info)
            if "create" in info:
                for name in info["create"]:
                    model.create(name)
                continue
            check_snapshots(txn.tid)
            stats["txns"] += 1
            stats["carried"] += bool(info["carried"])
            written = {name: set() for name in ARRAYS}
            for op in info["ops"]:
                stats["ops"][op[0]] = stats["ops"].get(op[0], 0) + 1
                written[op[1]] |= model.apply(op, info["carried"], errors)
            check_txn(conn, txn, info, written)
            if stats["txns"] % FULL_CHECK_EVERY == 0:
                full_check(conn, txn.tid, "txn")
            if len(errors) > 20:
                break
        check_snapshots(None)
        full_check(replay.conn, storage.lastTransaction(), "final state at")
    finally:
        it.close()
        replay.close()
        storage.close()
    return errors, stats


def check_the_verifier(d):
    """The verifier on transactions made here, in a FileStorage of its own
    in `d`: a write of only the later columns of a row of B straddling
    blocks 0 and 1 under a new fixed format (block 0 is not written, and
    keeps its old format), then a transaction whose block is stored in
    another format than the one it records (as a library writing the wrong
    format would). Returns what the verifier got wrong."""
    import ZODB
    from ZODB.FileStorage import FileStorage

    os.makedirs(d)
    open(os.path.join(d, "reader.log"), "w").close()
    db = ZODB.DB(FileStorage(os.path.join(d, "data.fs")))
    conn, tm = create_arrays(db)
    b = conn.root()["B"]
    b.fileh_open()
    straddling = ARRAYS["B"][2] // itemsize("B")  # bytes 131070..131080: block 1 from its column 1

    def txn(fmt, ops, recorded=None):
        b.zfile.zblk_fmt = fmt
        for op in ops:
            if op[0] == "append":
                b.append(values("B", (op[3], *ARRAYS["B"][1]), op[4]))
            else:
                v = b[index(op[3])]
                v[...] = values("B", v.shape, op[4])
        describe(tm.get(), [["fmt", "B", fmt], *ops], False, {"A": "", "B": recorded or fmt}, ["check", 0])
        tm.commit()

    txn("ZBlk0", [["append", "B", 0, 2 * straddling, 1]])
    txn("ZBlk1", [["set", "B", 2 * straddling, [(straddling, straddling + 1), (1, 5)], 2]])
    txn("ZBlk0", [["set", "B", 2 * straddling, [(0, 8)], 3]], recorded="ZBlk1")
    b._v_fileh.close()
    conn.close()
    db.close()
    errors, _ = verify(d)
    expected = "B block 0 is ZBlk0, written with format ZBlk1"
    if len(errors) != 1 or expected not in errors[0]:
        return [f"on known transactions ({d}) it reported {errors or 'nothing'}; expected only one: {expected!r}"]
    return []


def supervise(d, seconds):
    t0 = time.monotonic()
    # Whole-block rewrites make the FileStorage grow by about half a GB
    # a minute here: refuse a run the disk cannot hold.
    need = (1 + seconds / 60) * (1 << 30)
    free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
    if free < need:
        print(f"zodb stress FAILED: {free >> 20} MiB free in {d}, a {seconds:.0f} s run needs about {int(need) >> 20}")
        return 1
    verifier = check_the_verifier(os.path.join(d, "verifier"))
    procs, kills = run(d, seconds)
    storage = check_storage(d)
    counts, client_errors = client_counts(d)
    errors, stats = verify(d)
    problems = {
        "differences from the committed transactions": errors,
        "storage checks": storage,
        "processes that died": procs,
        "unexpected exceptions in clients": client_errors,
        "errors of the verifier itself": verifier,
    }
    ops = ", ".join(f"{v} {k}" for k, v in sorted(stats["ops"].items()))
    summary = (
        f"{stats['txns']} transactions verified ({stats['carried']} carried; {ops}), "
        f"{stats['blocks']} blocks and {stats['full']} whole states compared, {stats['snapshots']} reader snapshots; "
        f"clients: {counts.get('commit', 0)} commits, {counts.get('conflict', 0)} conflicts "
        f"({counts.get('retry', 0)} retried, {counts.get('carried', 0)} carried, "
        f"{counts.get('carry-conflict', 0)} carried and conflicting again, {counts.get('give-up', 0)} given up), "
        f"{counts.get('abort', 0)} aborts; {kills} writers killed, {counts.get('selfkill', 0)} killed mid-commit; "
        f"fstest, fsrefs clean; {time.monotonic() - t0:.0f}s"
    )
    if any(problems.values()):
        print("zodb stress FAILED: " + ", ".join(f"{len(v)} {k}" for k, v in problems.items() if v))
        for k, v in problems.items():
            for f in v[:3]:
                print(f"  {k}: " + f.replace("\n", "\n    "))
        print(summary.replace("fstest, fsrefs clean; ", ""))
        return 1
    if stats["txns"] < 50 or counts.get("conflict", 0) == 0:
        print(f"zodb stress FAILED: too little happened to mean anything: {summary}")
        return 1
    print(f"zodb stress OK: {summary}")
    return 0


def main():
    role = sys.argv[1]
    if role == "supervise":
        sys.exit(supervise(sys.argv[2], float(sys.argv[3])))
    elif role == "writer":
        writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif role == "reader":
        reader(sys.argv[2], sys.argv[3])
    elif role == "verify":  # again, on the directory of a run
        errors, stats = verify(sys.argv[2])
        print("\n".join(errors[:10]) or "no differences", stats)
    else:
        sys.exit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
