"""Python side of `cargo xtask bench` (issue 7, item 7).

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
"""

import argparse
import mmap
import os
import sys
import time
import zlib

import numpy as np

from bigfile import BigFile

MIB = 1 << 20
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


def fault_per_touch(f, touches, budget_blocks=16, nblocks=256):
    """Seconds per fault: touch one byte of each block cyclically."""
    with f.fileh_open(ram="memfd", budget=budget_blocks * BLK) as fh:
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


def adler_bigfile(path, size):
    f = OSFile(BLK, path)
    with f.fileh_open(ram="memfd", budget=64 * MIB) as fh:
        with fh.mmap(0, size // BLK) as vma:
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


def timed(fn, *args, passes):
    fn(*args)  # warm up: page cache, imports, first mappings
    times = []
    result = None
    for _ in range(passes):
        t = time.perf_counter()
        r = fn(*args)
        times.append(time.perf_counter() - t)
        assert result is None or r == result, "passes disagree"
        result = r
    return sum(times) / len(times), result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-dir", default="target/bench-data")
    args = ap.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    touches = 300 if args.quick else 2000
    size = (128 if args.quick else 512) * MIB
    passes = 3 if args.quick else 5

    out = {}
    log("python bench: no-op fault")
    out["fault_noop"] = fault_per_touch(NoopFile(BLK), touches)
    log("python bench: numpy zero-fill fault")
    out["fault_zero_numpy"] = fault_per_touch(ZeroFile(BLK), touches)

    path = data_file(args.data_dir, size)
    sums = {}
    for name, fn in [("bigfile", adler_bigfile), ("mmap", adler_mmap), ("readinto", adler_readinto)]:
        log(f"python bench: adler32 via {name}")
        out[f"adler32_{name}"], sums[name] = timed(fn, path, size, passes=passes)
    if len(set(sums.values())) != 1:
        raise SystemExit(f"adler32 differs between methods: {sums}")
    out["adler32_bytes"] = size
    for k, v in out.items():
        print(f"{k}\t{v}")


if __name__ == "__main__":
    main()
