# The race of races.rs with the Python bindings: loadblk and storeblk in
# Python, and garbage cycles made inside them whose __del__ runs
# gc.collect() and reads another mapping (a nested fault) while the callback
# is in progress. Same model: every 8-byte word says (block, word, version);
# owners write only their own blocks and check them exactly; discard holds a
# gate the owners hold shared. Prints "python races OK: ..." and exits 0, or
# prints what went wrong and exits 1. A crash or hang fails the scenario too.

import faulthandler
import gc
import mmap
import random
import sys
import threading
import time
import traceback

import numpy as np

from bigfile import RAM, WRITEOUT_MARKSTORED, WRITEOUT_STORE, BigFile

# As under pytest: faulthandler's SIGSEGV handler installed after bigfile's,
# which must go back on top and keep serving the page faults.
faulthandler.enable()

PS = mmap.PAGESIZE
W = PS // 8
OWNERS, PER, RO = 3, 4, 12
OWNED = OWNERS * PER
TOTAL = OWNED + RO
OPS, HELPER_OPS = 12000, 1200
SEED = 0x5EED0003
MAGIC = 0xB1
SIDE_BLOCKS = 8

WIDX = np.arange(W, dtype=np.uint64)


def block_words(blk, versions):
    """The words of block `blk` at `versions` (an array of W versions)."""
    return (np.uint64(MAGIC << 56) | np.uint64(blk << 40) | (WIDX << np.uint64(28))
            | np.asarray(versions, dtype=np.uint64))


def word(blk, w, ver):
    return (MAGIC << 56) | (blk << 40) | (w << 28) | ver


def decode(v):
    v = int(v)
    if v >> 56 != MAGIC:
        return None
    return (v >> 40) & 0xFFFF, (v >> 28) & 0xFFF, v & 0x0FFFFFFF


violations = []
counts = {"dels": 0, "dels_in_callback": 0, "loads": 0, "stores": 0, "discards": 0, "busy": 0}
counts_lock = threading.Lock()
where = threading.local()


def count(key):
    with counts_lock:
        counts[key] += 1


class Side(BigFile):
    """The mapping __del__ reads: block b is all words of block 1000 + b."""

    def loadblk(self, blk, buf):
        np.frombuffer(buf, np.uint64)[:] = block_words(1000 + blk, np.zeros(W))

    def storeblk(self, blk, buf):
        violations.append("storeblk of the side file, which nobody writes")


side_ram = RAM("memfd,pagesize=%d" % PS)
side_fh = Side(PS).fileh_open(ram=side_ram)
side_vma = side_fh.mmap(0, SIDE_BLOCKS)
side_a = np.ndarray((SIDE_BLOCKS * W,), np.uint64, buffer=side_vma)
side_rng = random.Random(SEED ^ 0x51DE)


class Trigger:
    """Garbage in a cycle: only the GC frees it, at whatever allocation
    happens to trigger a collection, often inside loadblk or storeblk."""

    def __del__(self):
        count("dels")
        if getattr(where, "callback", 0):
            count("dels_in_callback")
        gc.collect()
        b, w = side_rng.randrange(SIDE_BLOCKS), side_rng.randrange(W)
        v = int(side_a[b * W + w])
        if v != word(1000 + b, w, 0):
            violations.append("__del__ read %#x from side block %d word %d" % (v, b, w))


def garbage():
    t = Trigger()
    t.cycle = t


class RaceFile(BigFile):
    def __new__(cls):
        obj = BigFile.__new__(cls, PS)
        obj.data = {}
        obj.lock = threading.Lock()
        return obj

    def versions(self, blk):
        with self.lock:
            d = self.data.get(blk)
        if d is None:
            return np.zeros(W, np.uint64)
        return d & np.uint64(0x0FFFFFFF)

    def loadblk(self, blk, buf):
        where.callback = getattr(where, "callback", 0) + 1
        try:
            garbage()
            with self.lock:
                d = self.data.get(blk)
            np.frombuffer(buf, np.uint64)[:] = block_words(blk, np.zeros(W)) if d is None else d
            count("loads")
            garbage()
        finally:
            where.callback -= 1

    def storeblk(self, blk, buf):
        where.callback = getattr(where, "callback", 0) + 1
        try:
            garbage()
            a = np.frombuffer(buf, np.uint64).copy()
            if blk >= OWNED:
                violations.append("storeblk of read-only block %d" % blk)
            expect = block_words(blk, np.zeros(W)) & np.uint64(~0x0FFFFFFF & (2**64 - 1))
            if not np.array_equal(a & np.uint64(~0x0FFFFFFF & (2**64 - 1)), expect):
                violations.append("storeblk of block %d: words of another block or garbage" % blk)
            with self.lock:
                self.data[blk] = a
            count("stores")
            garbage()
        finally:
            where.callback -= 1


class Gate:
    """Shared by owners around each operation, exclusive for discard."""

    def __init__(self):
        self.cond = threading.Condition()
        self.readers = 0
        self.writer = False

    def acquire_shared(self):
        with self.cond:
            while self.writer:
                self.cond.wait()
            self.readers += 1

    def release_shared(self):
        with self.cond:
            self.readers -= 1
            self.cond.notify_all()

    def acquire(self):
        with self.cond:
            while self.writer:
                self.cond.wait()
            self.writer = True
            while self.readers:
                self.cond.wait()

    def release(self):
        with self.cond:
            self.writer = False
            self.cond.notify_all()


def maps():
    with open("/proc/self/maps") as m:
        return m.read().splitlines()


def reservations():
    """Address ranges of the anonymous mappings made with MAP_NORESERVE
    (VmFlags `nr` in /proc/self/smaps): how both backends reserve a
    mapping's range. Any anonymous mapping would not do: a thread started
    during the run maps its signal stack and guard page anonymously, and may
    be given the address, and the size, of a mapping unmapped before."""
    out = set()
    anonymous = None  # the range of the last header line, if anonymous
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.startswith("VmFlags:"):
                if anonymous is not None and "nr" in line.split()[1:]:
                    out.add(anonymous)
                anonymous = None
                continue
            fields = line.split()
            lo_hi = fields[0].split("-") if fields else []
            if len(lo_hi) != 2:
                continue
            try:
                lo, hi = int(lo_hi[0], 16), int(lo_hi[1], 16)
            except ValueError:
                continue
            # A header: range, perms, offset, device, inode, then the path.
            anonymous = (lo, hi) if len(fields) == 5 else None
    return out


def ram_files():
    """Inodes of the RAM files mapped in the process."""
    return {line.split()[4] for line in maps() if "memfd:bigfile-ram" in line}


# The side file's RAM file stays mapped for good (its window, its pages);
# no other may be left at the end.
side_vma.prefault()
side_ram_files = ram_files()
ranges = []

f = RaceFile()
budget_pages = 20
ram = RAM("memfd,pagesize=%d" % PS, budget=budget_pages * PS)
fh = f.fileh_open(ram=ram)
vma = fh.mmap(0, TOTAL)
ranges.append((vma.addr_start, vma.addr_stop))
A = np.ndarray((TOTAL * W,), np.uint64, buffer=vma)
gate = Gate()
discards = [0]
written = [0] * OWNED
models = {}
failures = []
progress = [0]
owners_left = [OWNERS]


def pace(k):
    """Wait until the owners are k / HELPER_OPS of the way through, so the
    helpers' fixed number of operations spreads over the whole race."""
    target = OWNERS * OPS * k // HELPER_OPS
    while progress[0] < target and owners_left[0]:
        time.sleep(0.0005)


def check_foreign(arr, base, blk, w):
    v = int(arr[(blk - base) * W + w])
    bound = written[blk] if blk < OWNED else 0
    d = decode(v)
    if d is None or d[0] != blk or d[1] != w or d[2] > bound:
        raise AssertionError("block %d word %d reads %#x: not version <= %d of it" % (blk, w, v, bound))


def owner(t):
    try:
        owner_ops(t)
    finally:
        owners_left[0] -= 1


def owner_ops(t):
    rng = random.Random(SEED ^ t)
    first = t * PER
    mem = [np.zeros(W, np.uint64) for _ in range(PER)]
    last = [np.zeros(W, np.uint64) for _ in range(PER)]
    seen = 0
    for i in range(OPS):
        progress[0] += 1
        gate.acquire_shared()
        try:
            if discards[0] != seen:
                seen = discards[0]
                for j in range(PER):
                    mem[j] = f.versions(first + j)
            j = rng.randrange(PER)
            blk = first + j
            w = rng.randrange(W)
            op = rng.randrange(100)
            if op < 40:
                v = int(last[j][w]) + 1
                last[j][w] = v
                written[blk] = max(written[blk], v)
                A[blk * W + w] = word(blk, w, v)
                mem[j][w] = v
            elif op < 65:
                got, want = int(A[blk * W + w]), word(blk, w, int(mem[j][w]))
                if got != want:
                    raise AssertionError("owner %d op %d: own block %d word %d reads %#x, wrote %#x"
                                         % (t, i, blk, w, got, want))
            elif op < 85:
                check_foreign(A, 0, OWNED + rng.randrange(RO), w)
            elif op < 95:
                check_foreign(A, 0, rng.randrange(OWNED), w)
            else:
                try:
                    fh.invalidate_page(blk)
                except RuntimeError as e:
                    if "writeout of this file handle is in progress" not in str(e):
                        raise
                    count("busy")
                else:
                    mem[j] = f.versions(blk)
        finally:
            gate.release_shared()
    models[t] = (mem, seen)


def committer():
    rng = random.Random(SEED ^ 0x100)
    for k in range(HELPER_OPS):
        pace(k)
        flags = WRITEOUT_STORE if rng.randrange(4) == 0 else WRITEOUT_STORE | WRITEOUT_MARKSTORED
        fh.dirty_writeout(flags)


def chaos():
    rng = random.Random(SEED ^ 0x101)
    for k in range(HELPER_OPS):
        pace(k)
        op = rng.randrange(8)
        if op == 0:
            gate.acquire()
            try:
                while True:
                    try:
                        fh.dirty_discard()
                        break
                    except RuntimeError as e:
                        if "writeout of this file handle is in progress" not in str(e):
                            raise
                discards[0] += 1
                count("discards")
            finally:
                gate.release()
        elif op <= 5:
            try:
                fh.invalidate_page(OWNED + rng.randrange(RO))
            except RuntimeError as e:
                if "writeout of this file handle is in progress" not in str(e):
                    raise
                count("busy")
        else:
            ram.reclaim()


def mapper():
    rng = random.Random(SEED ^ 0x102)
    for k in range(HELPER_OPS):
        pace(k)
        n = 1 + rng.randrange(6)
        start = rng.randrange(TOTAL - n + 1)
        m = fh.mmap(start, n)
        ranges.append((m.addr_start, m.addr_stop))
        if rng.randrange(3) == 0:
            m.prefault()
        a = np.ndarray((n * W,), np.uint64, buffer=m)
        for _ in range(4):
            check_foreign(a, start, start + rng.randrange(n), rng.randrange(W))
        del a
        m.close()


def guarded(fn, *args):
    def run():
        try:
            fn(*args)
        except BaseException as e:
            failures.append("%s: %s" % (fn.__name__, traceback.format_exc()))
    return run


def main():
    global A, vma
    gc.set_threshold(30, 5, 5)
    # Switch threads often, so Python code of one thread runs inside
    # another's callbacks' windows.
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=guarded(owner, t)) for t in range(OWNERS)]
    threads += [threading.Thread(target=guarded(fn)) for fn in (committer, chaos, mapper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    problems = failures + violations
    if problems:
        print("\n".join(problems))
        sys.exit(1)

    for t, (mem, seen) in list(models.items()):
        if seen != discards[0]:
            # A discard after this owner's last operation dropped its
            # changes: its blocks hold what the file has.
            models[t] = ([f.versions(t * PER + j) for j in range(PER)], discards[0])

    def expect(blk):
        if blk < OWNED:
            return models[blk // PER][0][blk % PER]
        return np.zeros(W, np.uint64)

    for blk in range(TOTAL):
        got = A[blk * W:(blk + 1) * W].copy()
        if not np.array_equal(got, block_words(blk, expect(blk))):
            print("after the race block %d differs from the model" % blk)
            sys.exit(1)
    fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
    for blk in range(TOTAL):
        if not np.array_equal(f.versions(blk), expect(blk)):
            print("after the final writeout the file's block %d differs from the model" % blk)
            sys.exit(1)
    st = fh.stats()
    rs = ram.stats()
    if st["dirty_pages"] or fh.dirty_blocks():
        print("dirty after the final writeout: %r" % st)
        sys.exit(1)
    if rs["resident_bytes"] > rs["budget"]:
        print("over budget: %r" % rs)
        sys.exit(1)
    if st["loads"] != counts["loads"]:
        print("handle counted %d loads, loadblk ran %d times" % (st["loads"], counts["loads"]))
        sys.exit(1)
    if counts["dels_in_callback"] == 0:
        print("no __del__ ran inside loadblk/storeblk: the scenario tested nothing of GC")
        sys.exit(1)
    if violations:
        print("\n".join(violations))
        sys.exit(1)
    del A
    vma.close()
    ram.reclaim()
    rs = ram.stats()
    if rs["resident_pages"] or rs["resident_bytes"] or rs["dirty_pages"]:
        print("RAM accounting not back to zero: %r" % rs)
        sys.exit(1)
    # The leftover check below must see a reservation when there is one.
    probe = fh.mmap(0, 2)
    if (probe.addr_start, probe.addr_stop) not in reservations():
        print("a live mapping's reservation is not seen in /proc/self/smaps")
        sys.exit(1)
    probe.close()
    del probe
    fh.close()
    # Closed, the mapping's addresses stay taken (by zeros, no file) while
    # its VMA object lives; they go with it.
    for line in maps():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo < vma.addr_stop and hi > vma.addr_start and "bigfile-ram" in line:
            print("a closed mapping still shows RAM pages: " + line)
            sys.exit(1)
    del vma
    gc.collect()
    # Exactly a mapping's range: a part of it would be a piece or a page.
    for lo, hi in sorted(reservations() & set(ranges)):
        print("a mapping's reservation is still there: %x-%x" % (lo, hi))
        sys.exit(1)
    left = ram_files() - side_ram_files
    if left:
        print("RAM files left mapped (inodes %s):\n%s" % (left, "\n".join(maps())))
        sys.exit(1)
    print("python races OK: %d loads, %d stores, %d reclaims, %d discards, %d busy skips, "
          "%d __del__ (%d inside loadblk/storeblk), %d mappings made and unmapped"
          % (st["loads"], counts["stores"], rs["reclaims"], counts["discards"], counts["busy"],
             counts["dels"], counts["dels_in_callback"], len(ranges)))


main()
