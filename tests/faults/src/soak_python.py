# A model-based randomized soak of the Python bindings (`soak/python`):
# threads reading and writing one handle through several overlapping
# mappings (numpy arrays and memoryviews, views spanning two blocks),
# mmap_cached windows and mappings of their own that they close under live
# arrays; a chaos thread writing out (STORE and MARKSTORED together and
# apart), discarding, invalidating blocks whose storage it changed behind
# the handle, advising, collecting garbage; loadblk and storeblk failing now
# and then; for block sizes of 4 KiB, 64 KiB and 2 MiB and budgets of 1 to
# 16 pages. Every read is checked against the model, the resident figure
# against the budget + 1 block, and the storage at the end against the
# model. Prints "python soak OK: ..." and exits 0, or what went wrong and
# exits 1; a crash or a hang fails the scenario too.
#
# The model. Every 8-byte word of block b holds word(b, w, version). Each
# owner thread alone writes its blocks (a random word range at a time, a new
# version, one more than any before in that block), so it knows their exact
# content; the other blocks change only under the exclusive gate (writeout,
# discard, invalidate), so every thread knows them exactly too, except the
# other owners' blocks, of which a reader checks that each word is of that
# block and word and no newer than the block's last version. Writes between
# a STORE and a separate MARKSTORED would be marked stored without being
# stored (the documented contract): the chaos thread holds the gate across
# both.
#
# Contracts this relies on, as documented: reads see the handle's changes
# over the storage; a clean page reloaded after a reclaim shows the storage
# as it is then, so storage is changed only together with invalidate_page
# under the gate; a write that fills the budget with dirty pages is fatal
# (SIGBUS), so dirty blocks are capped below the budget; an instruction
# that touches two blocks needs both at once, and threads that together need
# more pages than the budget holds progress only as their timing lets them
# ("Accesses spanning pages" in ARCHITECTURE.md), so reads spanning two
# blocks are made only where the budget leaves room for every thread's.
#
# Usage: python soak_python.py SECONDS

import gc
import mmap
import random
import sys
import threading
import time
import traceback

import numpy as np

from bigfile import WRITEOUT_MARKSTORED, WRITEOUT_STORE, BigFile

OS_PAGE = mmap.PAGESIZE
MAGIC = 0xB5
OWNERS = 3
SEED = 0x50A4

# (block size, budget in pages, blocks): the small budgets, the usual ones,
# and blocks as large as a huge page.
CONFIGS = [
    (4 << 10, 1, 16),
    (4 << 10, 2, 24),
    (4 << 10, 6, 24),
    (64 << 10, 3, 16),
    (64 << 10, 16, 24),
    (2 << 20, 4, 10),
    (2 << 20, 16, 20),
    (4 << 10, 16, 40),
]


def word(blk, w, versions):
    """The words w (an array) of block `blk` at `versions` (an array)."""
    return (
        np.uint64(MAGIC << 56)
        | np.uint64(blk << 44)
        | (np.asarray(w, np.uint64) << np.uint64(24))
        | np.asarray(versions, np.uint64)
    )


class Failed(Exception):
    pass


class Gate:
    """Shared by readers and writers, exclusive for the chaos thread's
    operations that change blocks behind their owners."""

    def __init__(self):
        self.cond = threading.Condition()
        self.shared = 0
        self.exclusive = False
        self.waiting = 0     # for exclusive use: they go first

    def __enter__(self):
        with self.cond:
            while self.exclusive or self.waiting:
                self.cond.wait()
            self.shared += 1

    def __exit__(self, *exc):
        with self.cond:
            self.shared -= 1
            self.cond.notify_all()

    def exclusively(self):
        gate = self

        class Exclusive:
            def __enter__(self):
                with gate.cond:
                    gate.waiting += 1
                    while gate.exclusive or gate.shared:
                        gate.cond.wait()
                    gate.waiting -= 1
                    gate.exclusive = True

            def __exit__(self, *exc):
                with gate.cond:
                    gate.exclusive = False
                    gate.cond.notify_all()

        return Exclusive()


class Storage(BigFile):
    """The file: blocks in a dict, loads and stores failing now and then
    (a load never twice in a row for one block, so the retry policy always
    gets it), cycles of garbage made inside the calls."""

    def __new__(cls, blksize, nblocks, rng_seed):
        obj = BigFile.__new__(cls, blksize)
        obj.words = blksize // 8
        obj.blocks = {b: word(b, np.arange(obj.words), 0) for b in range(nblocks)}
        obj.lock = threading.RLock()   # __del__ of garbage takes it too
        obj.rng = random.Random(rng_seed)
        obj.failed_last = set()
        obj.fail_stores = False
        obj.counts = {"loads": 0, "load_failures": 0, "stores": 0, "store_failures": 0, "garbage": 0}
        return obj

    def loadblk(self, blk, buf):
        with self.lock:
            if blk not in self.failed_last and self.rng.random() < 0.03:
                self.failed_last.add(blk)
                self.counts["load_failures"] += 1
                fail = True
            else:
                self.failed_last.discard(blk)
                self.counts["loads"] += 1
                fail = False
            data = self.blocks[blk]
            litter = self.rng.random() < 0.05
        if litter:
            garbage(self)
        if fail:
            raise OSError("injected load failure of block %d" % blk)
        np.frombuffer(buf, np.uint64)[:] = data

    def storeblk(self, blk, buf):
        data = np.frombuffer(buf, np.uint64).copy()
        with self.lock:
            if self.fail_stores and self.rng.random() < 0.2:
                self.counts["store_failures"] += 1
                raise OSError("injected store failure of block %d" % blk)
            self.counts["stores"] += 1
            self.blocks[blk] = data


class Litter:
    """Garbage in a cycle: freed by whatever collection happens next, often
    inside a loadblk or a fault."""

    def __init__(self, storage):
        self.storage = storage
        self.me = self

    def __del__(self):
        with self.storage.lock:
            self.storage.counts["garbage"] += 1


def garbage(storage):
    Litter(storage)


class Soak:
    def __init__(self, blksize, budget, nblocks, seconds, seed):
        self.blksize, self.budget, self.nblocks = blksize, budget, nblocks
        self.words = blksize // 8
        self.seed = seed
        self.deadline = time.monotonic() + seconds
        self.storage = Storage(blksize, nblocks, seed)
        self.fh = self.storage.fileh_open(ram="memfd", budget=budget * blksize)
        self.fh.set_load_policy(3, 0.0)
        # Overlapping mappings of the one handle: all of it, its second
        # half, all but the first and last block.
        self.mappings = [
            self.fh.mmap(0, nblocks),
            self.fh.mmap(nblocks // 2, nblocks - nblocks // 2),
            self.fh.mmap(1, nblocks - 2),
        ]
        self.gate = Gate()
        self.lock = threading.Lock()
        # The handle's content as versions per word, the last version of
        # each block, the dirty blocks.
        self.versions = {b: np.zeros(self.words, np.uint64) for b in range(nblocks)}
        self.last = {b: 0 for b in range(nblocks)}
        self.dirty = set()
        # Blocks no thread owns being changed by invalidate_live: to what.
        self.live = {}
        # Reads spanning two blocks only where every thread's two blocks fit
        # beside the dirty ones; at most `dirty_cap` dirty blocks (a budget
        # full of them is fatal).
        room = 2 * (OWNERS + 1)
        self.spanning = budget >= room + 2
        self.dirty_cap = budget - room if self.spanning else max(0, budget - 2)
        per = max(1, (nblocks - 4) // OWNERS)
        self.owned = {t: list(range(t * per, (t + 1) * per)) for t in range(OWNERS)}
        self.owner = {b: t for t, bs in self.owned.items() for b in bs}
        self.errors = []
        self.counts = {k: 0 for k in (
            "reads", "spanning_reads", "writes", "writeouts", "writeouts_apart", "writeout_failures",
            "discards", "invalidations", "live_invalidations", "prefaults", "advice", "own_mappings", "closed_under_arrays",
            "cached", "gc", "resident_checks")}

    def count(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def fail(self, msg):
        raise Failed("%s (blksize %d, budget %d)" % (msg, self.blksize, self.budget))

    # ~~~ accesses

    def covering(self, rng, first, last):
        """A mapping holding blocks first..last, and the byte offset of
        `first` in it."""
        choices = []
        for vma in self.mappings:
            off, n = vma.filerange()
            if off <= first and last < off + n:
                choices.append((vma, (first - off) * self.blksize))
        if rng.random() < 0.15:
            vma = self.fh.mmap_cached(first, last - first + 1)
            off, _ = vma.filerange()
            self.count("cached")
            return vma, (first - off) * self.blksize
        return rng.choice(choices)

    def view(self, rng, vma, offset, nwords):
        """The words at `offset` of `vma`: a numpy array, or the bytes of a
        memoryview slice."""
        if rng.random() < 0.5:
            a = np.ndarray((len(vma) // 8,), np.uint64, buffer=vma)
            return a[offset // 8: offset // 8 + nwords].copy()
        mv = memoryview(vma)
        try:
            return np.frombuffer(bytes(mv[offset: offset + nwords * 8]), np.uint64)
        finally:
            mv.release()

    def snapshot(self, blk):
        """What a read of block `blk` may see, taken before and after it:
        for a block no thread owns, its version and the version it is
        being changed to (`invalidate_live`)."""
        if blk in self.owner:
            return ()
        with self.lock:
            return (int(self.versions[blk][0]), self.live.get(blk))

    def expect(self, me, blk, w0, got, before=()):
        """Check words w0.. of block `blk` read by thread `me`; `before`
        is the block's snapshot taken before the read."""
        w = np.arange(w0, w0 + len(got))
        owner = self.owner.get(blk)
        if owner is None:
            # Any of the versions the block had from before the read to
            # after it, word by word (a reclaim and reload in the middle of
            # a copy may mix them); never one older than it had before.
            # Versions of a block only grow, and the chaos thread may change
            # it more than once during one read (a read held up in a loadblk
            # that gave up the GIL): so every one in between too.
            known = [v for v in before + self.snapshot(blk) if v is not None]
            allowed = list(range(min(known), max(known) + 1))
            top = got & np.uint64(~0xFFFFFF & (2**64 - 1))
            seen = got & np.uint64(0xFFFFFF)
            if not np.array_equal(top, word(blk, w, 0)) or not np.isin(seen, allowed).all():
                bad = int(np.argmax(~np.isin(seen, allowed) | (top != word(blk, w, 0))))
                self.fail("block %d word %d: read %#x, expected one of versions %s" % (blk, w0 + bad, int(got[bad]), allowed))
            return
        if owner == me:
            want = word(blk, w, self.versions[blk][w0: w0 + len(got)])
            if not np.array_equal(got, want):
                bad = int(np.argmax(got != want))
                self.fail("block %d word %d: read %#x, expected %#x" % (blk, w0 + bad, int(got[bad]), int(want[bad])))
            return
        # Another owner's block: of this block and word, no newer than its
        # last version (read after the data).
        with self.lock:
            last = self.last[blk]
        top = got & np.uint64(~0xFFFFFF & (2**64 - 1))
        if not np.array_equal(top, word(blk, w, 0)) or int((got & np.uint64(0xFFFFFF)).max()) > last:
            self.fail("block %d owned by thread %d: words of another block, garbage or from the future" % (blk, owner))

    def read(self, me, rng):
        span = self.spanning and rng.random() < 0.3
        blk = rng.randrange(self.nblocks - (1 if span else 0))
        last = blk + 1 if span else blk
        vma, offset = self.covering(rng, blk, last)
        before = [self.snapshot(b) for b in (blk, last)]
        if span:
            n = rng.randrange(1, self.words)
            w0 = self.words - n
            got = self.view(rng, vma, offset + w0 * 8, 2 * n)
            self.expect(me, blk, w0, got[:n], before[0])
            self.expect(me, blk + 1, 0, got[n:], before[1])
            self.count("spanning_reads")
        else:
            w0 = rng.randrange(self.words)
            n = rng.randrange(1, min(self.words - w0, 4096) + 1)
            self.expect(me, blk, w0, self.view(rng, vma, offset + w0 * 8, n), before[0])
        self.count("reads")

    def write(self, me, rng):
        blk = rng.choice(self.owned[me])
        with self.lock:
            if blk not in self.dirty and len(self.dirty) >= self.dirty_cap:
                return
            self.dirty.add(blk)
            self.last[blk] += 1
            v = self.last[blk]
        w0 = rng.randrange(self.words)
        n = rng.randrange(1, min(self.words - w0, 2048) + 1)
        data = word(blk, np.arange(w0, w0 + n), np.full(n, v, np.uint64))
        vma, offset = self.covering(rng, blk, blk)
        at = offset + w0 * 8
        if rng.random() < 0.5:
            np.ndarray((len(vma) // 8,), np.uint64, buffer=vma)[at // 8: at // 8 + n] = data
        else:
            mv = memoryview(vma)
            mv[at: at + n * 8] = data.tobytes()
            mv.release()
        self.versions[blk][w0: w0 + n] = v
        self.count("writes")

    def prefault(self, me, rng):
        blk = rng.choice(self.owned[me])
        vma, offset = self.covering(rng, blk, blk)
        write = rng.random() < 0.5
        if write:
            with self.lock:
                if blk not in self.dirty and len(self.dirty) >= self.dirty_cap:
                    return
                self.dirty.add(blk)
        vma.prefault(offset, offset + self.blksize, write=write)
        self.count("prefaults")

    def own_mapping(self, me, rng):
        """A mapping of its own, closed while an array over it lives: the
        array then reads zeros, never the file."""
        blk = rng.choice(self.owned[me])
        vma = self.fh.mmap(blk, 1)
        a = np.ndarray((self.words,), np.uint64, buffer=vma)
        w0 = rng.randrange(self.words)
        self.expect(me, blk, w0, a[w0: w0 + 16].copy())
        vma.close()
        if a[w0: w0 + 16].any():
            self.fail("an array over a closed mapping of block %d reads non-zero" % blk)
        self.count("own_mappings")
        self.count("closed_under_arrays")

    def check_resident(self):
        rs = self.fh.ram_stats()
        if rs["resident_bytes"] > rs["budget"] + self.blksize:
            self.fail("resident %d bytes over the budget %d + 1 block" % (rs["resident_bytes"], rs["budget"]))
        self.count("resident_checks")

    # ~~~ the chaos thread's operations, under the exclusive gate

    def writeout(self, rng):
        apart = rng.random() < 0.4
        self.storage.fail_stores = rng.random() < 0.3
        try:
            if apart:
                self.fh.dirty_writeout(WRITEOUT_STORE)
                self.read(None, rng)      # the thread may read between
                self.fh.dirty_writeout(WRITEOUT_MARKSTORED)
                self.count("writeouts_apart")
            else:
                self.fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
        except OSError as e:
            if "injected store failure" not in str(e):
                raise
            self.count("writeout_failures")
            if sorted(self.fh.dirty_blocks()) != sorted(self.dirty):
                self.fail("after a failed writeout the dirty blocks are %s, not %s" % (self.fh.dirty_blocks(), sorted(self.dirty)))
            return
        finally:
            self.storage.fail_stores = False
        for blk in self.dirty:
            stored = self.storage.blocks[blk]
            if not np.array_equal(stored, word(blk, np.arange(self.words), self.versions[blk])):
                self.fail("block %d stored differs from the handle's" % blk)
        if self.fh.dirty_blocks():
            self.fail("dirty blocks %s after a writeout" % self.fh.dirty_blocks())
        self.dirty.clear()
        self.count("writeouts")

    def from_storage(self, blk):
        self.versions[blk] = self.storage.blocks[blk] & np.uint64(0xFFFFFF)

    def discard(self, rng):
        self.fh.dirty_discard()
        for blk in self.dirty:
            self.from_storage(blk)
        self.dirty.clear()
        self.count("discards")

    def invalidate(self, rng):
        blk = rng.randrange(self.nblocks)
        if blk not in self.dirty:
            # The storage changes behind the handle (another client's commit).
            with self.lock:
                self.last[blk] += 1
                v = self.last[blk]
            with self.storage.lock:
                self.storage.blocks[blk] = word(blk, np.arange(self.words), np.full(self.words, v, np.uint64))
        self.fh.invalidate_page(blk)
        self.dirty.discard(blk)
        with self.lock:
            self.from_storage(blk)
        self.count("invalidations")

    def invalidate_live(self, rng):
        """A block no thread owns changes in the storage and is invalidated
        while the others read it (and load it, and reclaim it): reads that
        start after invalidate_page returned see the new content."""
        ro = [b for b in range(self.nblocks) if b not in self.owner]
        blk = rng.choice(ro)
        with self.lock:
            self.last[blk] += 1
            v = self.live[blk] = self.last[blk]
        with self.storage.lock:
            self.storage.blocks[blk] = word(blk, np.arange(self.words), np.full(self.words, v, np.uint64))
        self.fh.invalidate_page(blk)
        with self.lock:
            self.versions[blk][:] = v
            del self.live[blk]
        self.count("live_invalidations")

    # ~~~ threads

    def owner_thread(self, me):
        rng = random.Random(self.seed * 31 + me)
        while time.monotonic() < self.deadline:
            r = rng.random()
            with self.gate:
                if r < 0.55:
                    self.read(me, rng)
                elif r < 0.85:
                    self.write(me, rng)
                elif r < 0.92:
                    self.prefault(me, rng)
                elif r < 0.97:
                    self.own_mapping(me, rng)
                else:
                    self.check_resident()

    def chaos_thread(self):
        rng = random.Random(self.seed * 31 + 99)
        while time.monotonic() < self.deadline:
            r = rng.random()
            if r < 0.1:
                with self.gate.exclusively():
                    self.writeout(rng)
            elif r < 0.14:
                with self.gate.exclusively():
                    self.discard(rng)
            elif r < 0.22:
                with self.gate.exclusively():
                    self.invalidate(rng)
            elif r < 0.27:
                with self.gate:
                    self.invalidate_live(rng)
            elif r < 0.3:
                rng.choice(self.mappings).advise(rng.choice(["normal", "sequential"]))
                self.count("advice")
            elif r < 0.35:
                gc.collect()
                self.count("gc")
            elif r < 0.4:
                self.fh.release_cached()
            else:
                with self.gate:
                    self.read(None, rng)
            time.sleep(0.0005)

    def run(self):
        def guarded(body, *args):
            try:
                body(*args)
            except BaseException:
                self.errors.append(traceback.format_exc())
                self.deadline = 0

        threads = [threading.Thread(target=guarded, args=(self.owner_thread, t)) for t in range(OWNERS)]
        threads.append(threading.Thread(target=guarded, args=(self.chaos_thread,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.errors:
            raise Failed("\n".join(self.errors))
        self.finish()

    def finish(self):
        """Everything written out; the storage, a fresh handle and the
        handle itself against the model."""
        self.fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
        self.dirty.clear()
        expected = {b: word(b, np.arange(self.words), self.versions[b]) for b in range(self.nblocks)}
        for b in range(self.nblocks):
            if not np.array_equal(self.storage.blocks[b], expected[b]):
                self.fail("block %d in the storage differs from the model at the end" % b)
        self.storage.fail_stores = False
        fresh = self.storage.fileh_open(ram="memfd", budget=self.budget * self.blksize)
        fresh.set_load_policy(3, 0.0)
        for fh in (self.fh, fresh):
            vma = fh.mmap(0, self.nblocks)
            a = np.ndarray((self.nblocks * self.words,), np.uint64, buffer=vma)
            for b in range(self.nblocks):
                if not np.array_equal(a[b * self.words: (b + 1) * self.words], expected[b]):
                    self.fail("block %d read at the end differs from the model" % b)
            del a
            vma.close()
        self.check_resident()
        s = self.fh.stats()
        if s["load_errors"] == 0 and self.storage.counts["load_failures"]:
            self.fail("injected load failures not counted")
        self.mappings.clear()
        self.fh.release_cached()
        self.fh.close()
        fresh.close()


def main():
    seconds = float(sys.argv[1])
    per = seconds / len(CONFIGS)
    totals = {}
    for i, (blksize, budget, nblocks) in enumerate(CONFIGS):
        soak = Soak(blksize, budget, nblocks, per, SEED + i)
        try:
            soak.run()
        except Failed as e:
            print("python soak FAILED: %s" % e, flush=True)
            sys.exit(1)
        for k, v in list(soak.counts.items()) + list(soak.storage.counts.items()):
            totals[k] = totals.get(k, 0) + v
    print(
        "python soak OK: %d configs, %s" % (len(CONFIGS), ", ".join("%d %s" % (v, k) for k, v in totals.items())),
        flush=True,
    )


if __name__ == "__main__":
    main()
