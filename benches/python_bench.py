"""Python side of `cargo xtask bench` (issue 7, item 7; issue 18).

Prints one `name<TAB>value` line per figure on stdout (seconds per
operation or per pass; `adler32_bytes` is the file size); the xtask merges
them into its table. Progress goes to stderr.

- fault_noop: a page fault whose Python loadblk does nothing (2 MiB blocks),
  in steady state: a mapping far larger than the RAM budget, touched
  cyclically, so every touch loads a block after reclaiming one.
- fault_zero_numpy: the same with a loadblk zero-filling the block through numpy.
- adler32_{bigfile,mmap,readinto}: zlib.adler32 of a file read through a
  file-backed BigFile (os.preadv in loadblk, 64 MiB budget), through Python's
  mmap, and with readinto a reused buffer. Seconds per whole-file pass.
- adler32_bigfile_sequential: the first with the mapping advised
  sequential (drop-behind: the page just left is recycled).
- adler32_file_{native,pyio}: the same through `bigfile.file_file`'s
  BigFile_File (blocks read in Rust, no Python call per block) and
  BigFile_File_PyIO (os.preadv in a Python loadblk).
- bigarray_sum_{native,pyio}[_64K]: numpy sum of the file as a BigArray of
  uint64, in 8 MiB slices, through each of the two, with 2 MiB (64 KiB)
  blocks. Seconds per pass.
- adler32_file_native_first_pass: the adler32 through BigFile_File in a
  fresh process (this script run again by `--first-pass`), with a budget
  of the whole file: every block takes a fresh RAM page, as in a
  process's first scan. Seconds for the pass, from opening the handle;
  compared with adler32_file_native (steady state: RAM pages recycled).
- writeout_{native,pyio}: `dirty_writeout` of `writeout_bytes` of dirty
  2 MiB blocks (already in the page cache) through each. Seconds per writeout.
- npsave_ram: `np.save` to a file of the data file's words held in RAM
  (a plain numpy array of `npsave_bytes`). Seconds per save.
- npsave_bigarray_uffd: `np.save` of the same words as a BigArray over a
  fresh BigFile_File handle on the userfaultfd backend (nothing loaded: the
  kernel's own accesses inside write(2) load every block), budget the whole
  array; npsave_bigarray_budget64_uffd: the same with a 64 MiB budget
  (blocks reclaimed during the save). On the signal backend the same save
  fails with EFAULT (checked), so npsave_bigarray_prefault is the save
  after `vma.prefault()` of the whole mapping (prefault timed with it).
  Their RAM is `BIGFILE_BENCH_RAM` (as for the Rust benches: e.g.
  `hugetlbfs`, which needs a huge page pool of the array's size), memfd by
  default. `--only npsave` measures these alone.

Every figure is measured on the signal backend (`fault_backend="signals"`
on each handle); those of faults and of scans through a mapping
(fault_*, adler32_bigfile*, adler32_file_native) also on userfaultfd,
printed with `_uffd` appended to their names, unless the process cannot
have userfaultfd (then they are left out, saying why on stderr).
"""

import argparse
import mmap
import os
import subprocess
import sys
import time
import zlib

import numpy as np

from bigfile import RAM, WRITEOUT_MARKSTORED, WRITEOUT_STORE, BigFile
from bigfile.bigarray import BigArray
from bigfile.file_file import BigFile_File, BigFile_File_PyIO

MIB = 1 << 20
# The RAM of the np.save figures (module docs).
NPSAVE_RAM = os.environ.get("BIGFILE_BENCH_RAM", "memfd")
BLK = 2 * MIB


class NoopFile(BigFile):
    def loadblk(self, blk, buf):
        pass

    def storeblk(self, blk, buf):
        pass


class ZeroFile(BigFile):
    def loadblk(self, blk, buf):
        np.ndarray((len(buf) // 8,), np.uint64, buffer=buf).fill(0)

    def storeblk(self, blk, buf):
        pass


class OSFile(BigFile):
    """Block n of an OS file at byte n * blksize; zeros past its end."""

    def __new__(cls, blksize, path):
        obj = BigFile.__new__(cls, blksize)
        obj.fd = os.open(path, os.O_RDONLY)
        return obj

    def loadblk(self, blk, buf):
        view = memoryview(buf)
        off = blk * len(view)
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], off + done)
            if n == 0:
                view[done:] = bytes(len(view) - done)
                break
            done += n
        view.release()

    def storeblk(self, blk, buf):
        raise OSError("read-only")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def fault_per_touch(f, touches, faults, budget_blocks=16, nblocks=256):
    """Seconds per fault on backend `faults`: touch one byte of each block
    cyclically."""
    with f.fileh_open(ram="memfd", budget=budget_blocks * BLK, fault_backend=faults) as fh:
        with fh.mmap(0, nblocks) as vma:
            m = memoryview(vma)
            for i in range(budget_blocks):
                m[i * BLK]
            blk = budget_blocks
            t = time.perf_counter()
            for _ in range(touches):
                m[blk * BLK]
                blk += 1
                if blk == nblocks:
                    blk = 0
            dt = time.perf_counter() - t
            st = fh.stats()
            m.release()
    if st["loads"] < touches:
        log(f"warning: {st['loads']} loads for {touches} touches")
    return dt / touches


def data_file(data_dir, size):
    path = os.path.join(data_dir, f"adler-{size // MIB}M.bin")
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    log(f"writing {path}")
    chunk = np.arange(BLK // 8, dtype=np.uint64)
    with open(path, "wb") as out:
        for i in range(size // BLK):
            out.write(((chunk + i * len(chunk)) * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1)).tobytes())
    return path


def adler_bigfile(path, size, faults, advice="normal"):
    f = OSFile(BLK, path)
    with f.fileh_open(ram="memfd", budget=64 * MIB, fault_backend=faults) as fh:
        with fh.mmap(0, size // BLK) as vma:
            vma.advise(advice)
            m = memoryview(vma)
            a = 1
            for off in range(0, size, BLK):
                a = zlib.adler32(m[off : off + BLK], a)
            m.release()
    os.close(f.fd)
    return a


def adler_mmap(path, size):
    with open(path, "rb") as fobj:
        mm = mmap.mmap(fobj.fileno(), 0, prot=mmap.PROT_READ)
        m = memoryview(mm)
        a = 1
        for off in range(0, size, BLK):
            a = zlib.adler32(m[off : off + BLK], a)
        m.release()
        mm.close()
    return a


def adler_readinto(path, size):
    buf = bytearray(BLK)
    view = memoryview(buf)
    a = 1
    with open(path, "rb", buffering=0) as fobj:
        while True:
            n = fobj.readinto(buf)
            if not n:
                break
            a = zlib.adler32(view[:n], a)
    return a


def adler_file(cls, path, size, faults, blk=BLK):
    f = cls(path, blk)
    with f.fileh_open(ram="memfd", budget=64 * MIB, fault_backend=faults) as fh:
        with fh.mmap(0, size // blk) as vma:
            m = memoryview(vma)
            a = 1
            for off in range(0, size, BLK):
                a = zlib.adler32(m[off : off + BLK], a)
            m.release()
    return a


def adler_file_fresh(path, size, faults):
    """The adler32 of `path` through BigFile_File in a fresh process, budget
    the whole file (every RAM page fresh): seconds and the checksum."""
    out = subprocess.run(
        [sys.executable, __file__, "--data-dir", os.path.dirname(path), "--first-pass", path, str(size), faults],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), int(out[1])


def first_pass_child(path, size, faults):
    """In the fresh process: one timed pass, printed as `seconds checksum`."""
    t = time.perf_counter()
    with BigFile_File(path, BLK).fileh_open(ram="memfd", budget=size + BLK, fault_backend=faults) as fh:
        with fh.mmap(0, size // BLK) as vma:
            m = memoryview(vma)
            a = 1
            for off in range(0, size, BLK):
                a = zlib.adler32(m[off : off + BLK], a)
            dt = time.perf_counter() - t
            m.release()
    print(dt, a)


def bigarray_sum(cls, path, size, faults, blk=BLK):
    with cls(path, blk).fileh_open(ram="memfd", budget=64 * MIB, fault_backend=faults) as fh:
        a = BigArray((size // 8,), np.uint64, fh)
        chunk = 8 * MIB // 8
        total = 0
        for i in range(0, len(a), chunk):
            total += int(a[i : i + chunk].sum(dtype=np.uint64))
        del a
    return total % (1 << 64)


def writeout_time(cls, path, size, passes, faults):
    """Seconds per dirty_writeout of `size` bytes of dirty blocks."""
    times = []
    with cls(path, BLK).fileh_open(ram="memfd", budget=size + BLK, fault_backend=faults) as fh:
        with fh.mmap(0, size // BLK) as vma:
            arr = np.ndarray((size // 8,), np.uint64, buffer=memoryview(vma))
            for i in range(passes + 1):
                arr[::512] = i  # one word per 4 KiB page: every block dirty
                t = time.perf_counter()
                fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
                if i:  # the first pass extends the file: warm-up
                    times.append(time.perf_counter() - t)
            del arr
    return sum(times) / len(times)


def timed(fn, *args, passes, before=None):
    """Mean seconds of `fn(*args)` over `passes` after a first, untimed
    pass (page cache, imports, first mappings); `before()` runs untimed
    before each timed pass. Also the result, which every pass must agree on."""
    fn(*args)
    times = []
    result = None
    for _ in range(passes):
        if before is not None:
            before()
        t = time.perf_counter()
        r = fn(*args)
        times.append(time.perf_counter() - t)
        assert result is None or r == result, "passes disagree"
        result = r
    return sum(times) / len(times), result


def npsave_ram(arr, out):
    np.save(out, arr)
    os.remove(out)


def npsave_bigarray(path, size, out, budget, faults):
    """np.save of the file as a BigArray over a fresh handle on backend
    `faults`: no block loaded when write(2) reads the memory. The OSError
    of the save, if it fails (the signal backend), else None."""
    with BigFile_File(path, BLK).fileh_open(ram=NPSAVE_RAM, budget=budget, fault_backend=faults) as fh:
        a = BigArray((size // 8,), np.uint64, fh)
        try:
            np.save(out, a[:])
            failed = None
        except OSError as e:
            # Not kept: its traceback holds the view, which must be gone
            # before the handle closes.
            failed = str(e)
        del a
    os.remove(out)
    return failed


def npsave_uffd(path, size, out, budget):
    failed = npsave_bigarray(path, size, out, budget, "userfaultfd")
    if failed is not None:
        raise SystemExit(f"np.save of a BigArray on userfaultfd failed: {failed}")


def npsave_prefault(path, size, out):
    """np.save of the file through a fresh mapping prefaulted first
    (signal backend)."""
    with BigFile_File(path, BLK).fileh_open(ram=NPSAVE_RAM, budget=size, fault_backend="signals") as fh:
        with fh.mmap(0, size // BLK) as vma:
            vma.prefault()
            v = np.ndarray((size // 8,), np.uint64, buffer=vma)
            np.save(out, v)
            del v
    os.remove(out)


def check_saved(out, arr):
    saved = np.load(out, mmap_mode="r")
    same = saved.shape == arr.shape and bool(np.array_equal(saved, arr))
    del saved
    os.remove(out)
    if not same:
        raise SystemExit("np.save of a BigArray saved other data")


def npsave(data_dir, path, size, passes, backends):
    """The np.save figures (module docs); seconds per save."""
    out = os.path.join(data_dir, "npsave-out.npy")
    arr = np.fromfile(path, dtype=np.uint64)
    res = {"npsave_bytes": size}
    log("python bench: np.save of an array in RAM")
    res["npsave_ram"], _ = timed(npsave_ram, arr, out, passes=passes)
    failed = npsave_bigarray(path, size, out, size, "signals")
    if failed is None:
        raise SystemExit("np.save of a BigArray worked on the signal backend without prefault")
    log(f"python bench: np.save of a BigArray on signals without prefault fails, as expected: {failed}")
    log("python bench: np.save of a BigArray after vma.prefault (signals)")
    res["npsave_bigarray_prefault"], _ = timed(npsave_prefault, path, size, out, passes=passes)
    if "userfaultfd" in backends:
        for name, budget in [("npsave_bigarray_uffd", size), ("npsave_bigarray_budget64_uffd", 64 * MIB)]:
            log(f"python bench: np.save of a BigArray, budget {budget // MIB} MiB (userfaultfd)")
            with BigFile_File(path, BLK).fileh_open(ram=NPSAVE_RAM, budget=budget, fault_backend="userfaultfd") as fh:
                np.save(out, BigArray((size // 8,), np.uint64, fh)[:])
            check_saved(out, arr)
            res[name], _ = timed(npsave_uffd, path, size, out, budget, passes=passes)
    return res


def bench_args():
    """The arguments xtask gives a bench script: --quick, --data-dir (made)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-dir", default="target/bench-data")
    ap.add_argument("--only", choices=["npsave"], help="measure only these figures")
    ap.add_argument("--first-pass", nargs=3, metavar=("PATH", "SIZE", "FAULTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    return args


# The fault backends measured and the suffix of their figures' names.
FAULTS = {"signals": "", "userfaultfd": "_uffd"}


def backends():
    """The fault backends this process can have: signals, and userfaultfd
    unless it cannot be had (then its figures are left out, saying why)."""
    try:
        RAM("memfd", fault_backend="userfaultfd")
    except RuntimeError as e:
        log(f"python bench: no userfaultfd figures: {e}")
        return ["signals"]
    return ["signals", "userfaultfd"]


def main():
    args = bench_args()
    if args.first_pass:
        path, size, faults = args.first_pass
        first_pass_child(path, int(size), faults)
        return
    touches = 300 if args.quick else 2000
    size = (128 if args.quick else 512) * MIB
    passes = 3 if args.quick else 5
    on = backends()
    path = data_file(args.data_dir, size)
    if args.only == "npsave":
        for name, value in npsave(args.data_dir, path, size, passes, on).items():
            print(f"{name}\t{value}")
        return

    out = {"adler32_bytes": size}
    sums = {}
    for faults in on:
        sfx = FAULTS[faults]
        log(f"python bench: no-op fault ({faults})")
        out["fault_noop" + sfx] = fault_per_touch(NoopFile(BLK), touches, faults)
        log(f"python bench: numpy zero-fill fault ({faults})")
        out["fault_zero_numpy" + sfx] = fault_per_touch(ZeroFile(BLK), touches, faults)
        log(f"python bench: adler32 via bigfile ({faults})")
        out["adler32_bigfile" + sfx], sums["bigfile" + sfx] = timed(adler_bigfile, path, size, faults, passes=passes)
        log(f"python bench: adler32 via bigfile, advise('sequential') ({faults})")
        out["adler32_bigfile_sequential" + sfx], sums["sequential" + sfx] = timed(
            adler_bigfile, path, size, faults, "sequential", passes=passes
        )
        log(f"python bench: adler32 via BigFile_File (native) ({faults})")
        out["adler32_file_native" + sfx], sums["file_native" + sfx] = timed(
            adler_file, BigFile_File, path, size, faults, passes=passes
        )
        log(f"python bench: adler32 via BigFile_File (native), first pass of a fresh process ({faults})")
        passes_fresh = [adler_file_fresh(path, size, faults) for _ in range(passes)]
        out["adler32_file_native_first_pass" + sfx] = sum(t for t, _ in passes_fresh) / passes
        sums["file_native_first_pass" + sfx] = passes_fresh[0][1]
        if len({a for _, a in passes_fresh}) != 1:
            raise SystemExit(f"first passes disagree: {passes_fresh}")
    for name, fn in [("mmap", adler_mmap), ("readinto", adler_readinto)]:
        log(f"python bench: adler32 via {name}")
        out[f"adler32_{name}"], sums[name] = timed(fn, path, size, passes=passes)
    log("python bench: adler32 via BigFile_File (pyio)")
    out["adler32_file_pyio"], sums["file_pyio"] = timed(
        adler_file, BigFile_File_PyIO, path, size, "signals", passes=passes
    )
    if len(set(sums.values())) != 1:
        raise SystemExit(f"adler32 differs between methods: {sums}")
    out.update(npsave(args.data_dir, path, size, passes, on))

    # The rest on the signal backend only.
    for name, cls in [("native", BigFile_File), ("pyio", BigFile_File_PyIO)]:
        log(f"python bench: BigArray sum ({name})")
        out[f"bigarray_sum_{name}"], sums[f"sum_{name}"] = timed(
            bigarray_sum, cls, path, size, "signals", passes=passes
        )
        log(f"python bench: BigArray sum, 64 KiB blocks ({name})")
        out[f"bigarray_sum_{name}_64K"], sums[f"sum64_{name}"] = timed(
            bigarray_sum, cls, path, size, "signals", 64 << 10, passes=passes
        )
    if len({sums[k] for k in sums if k.startswith("sum")}) != 1:
        raise SystemExit(f"BigArray sums differ: {sums}")
    wsize = (32 if args.quick else 128) * MIB
    scratch = os.path.join(args.data_dir, "writeout.bin")
    for name, cls in [("native", BigFile_File), ("pyio", BigFile_File_PyIO)]:
        open(scratch, "wb").close()
        log(f"python bench: writeout via BigFile_File ({name})")
        out[f"writeout_{name}"] = writeout_time(cls, scratch, wsize, passes, "signals")
    os.remove(scratch)
    out["writeout_bytes"] = wsize
    for k, v in out.items():
        print(f"{k}\t{v}")


if __name__ == "__main__":
    main()
