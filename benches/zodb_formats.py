"""Costs of ZBigFile's block formats (ZBlk0, ZBlk1, auto) on a FileStorage
and through a ZEO server on 127.0.0.1, measured in order on one database:

- fill: every byte of a `--mib` file written, one commit (time, growth);
- small: 50 transactions each changing 8 bytes in a random block;
- read: the file read by a new client (no caches), MB/s;
- append: 256 transactions each appending 64 KiB to a ZBigArray;
- read appended: that array read by the new client, MB/s.

    python benches/zodb_formats.py [--mib 64] [--no-zeo] [--chunk 4096]

Prints a markdown table. Needs bigfile built into the running Python and
ZODB, ZEO, numpy installed.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from bigfile import file_zodb
from bigfile.bigarray.array_zodb import ZBigArray
from bigfile.file_zodb import ZBigFile, ZBlk1

BLK = 2 << 20


class Server:
    def __init__(self, path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.path = path
        self.p = subprocess.Popen(
            [sys.executable, "-m", "ZEO.runzeo", "-a", f"127.0.0.1:{self.port}", "-f", path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.p.poll() is not None:
                    raise RuntimeError("runzeo did not start")
                time.sleep(0.05)

    def db(self):
        import ZEO

        return ZEO.DB(("127.0.0.1", self.port), wait_timeout=30)

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=30)


def run(kind, fmt, mib, chunk):
    d = tempfile.mkdtemp(prefix="zbench-")
    path = os.path.join(d, "data.fs")
    server = Server(path) if kind == "zeo" else None
    open_db = server.db if server else (lambda: ZODB.DB(FileStorage(path)))
    file_zodb.ZBlk_fmt_write = fmt
    ZBlk1.CHUNKSIZE = chunk
    res = {}
    try:
        db = open_db()
        conn = db.open()
        root = conn.root()
        root["f"] = zf = ZBigFile(BLK)
        root["a"] = arr = ZBigArray((0,), np.uint8)
        transaction.commit()
        nblk = mib * (1 << 20) // BLK

        # fill: every block written in full, one commit
        fh = zf.fileh_open(budget=256 << 20)
        vma = fh.mmap(0, nblk)
        a = np.ndarray((len(vma),), np.uint8, buffer=vma)
        s0 = os.path.getsize(path)
        t = time.perf_counter()
        a[:] = np.random.default_rng(1).integers(1, 255, len(a), dtype=np.uint8)
        transaction.commit()
        res["fill s"] = time.perf_counter() - t
        res["fill MiB"] = (os.path.getsize(path) - s0) / 2**20

        # small changes: 8 bytes in a random block per transaction
        rng = np.random.default_rng(2)
        n = 50
        s0 = os.path.getsize(path)
        t = time.perf_counter()
        for _ in range(n):
            off = int(rng.integers(0, len(a) - 8))
            a[off : off + 8] += 1
            transaction.commit()
        res["small ms/txn"] = (time.perf_counter() - t) / n * 1e3
        res["small KiB/txn"] = (os.path.getsize(path) - s0) / n / 1024

        # append: 64 KiB per transaction
        n = 256
        s0 = os.path.getsize(path)
        t = time.perf_counter()
        piece = np.full(64 << 10, 7, np.uint8)
        for _ in range(n):
            arr.append(piece)
            transaction.commit()
        res["append ms/txn"] = (time.perf_counter() - t) / n * 1e3
        res["append KiB/txn"] = (os.path.getsize(path) - s0) / n / 1024
        del a
        vma.close()
        fh.close()
        conn.close()
        db.close()

        # cold read of the file (a new client: no object cache)
        db = open_db()
        conn = db.open()
        zf = conn.root()["f"]
        fh = zf.fileh_open(budget=64 << 20)
        vma = fh.mmap(0, nblk)
        a = np.ndarray((len(vma) // 8,), np.uint64, buffer=vma)
        t = time.perf_counter()
        step = BLK // 8
        total = 0
        for i in range(0, len(a), step):
            total += int(a[i : i + step].sum())
        dt = time.perf_counter() - t
        res["read MB/s"] = mib * 2**20 / dt / 1e6
        del a
        vma.close()
        fh.close()
        arr = conn.root()["a"]
        t = time.perf_counter()
        for i in range(0, len(arr), BLK):
            total += int(arr[i : i + BLK].sum())
        dt = time.perf_counter() - t
        res["read appended MB/s"] = len(arr) / dt / 1e6
        arr._v_fileh.close()
        transaction.abort()
        conn.close()
        db.close()
    finally:
        if server:
            server.stop()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=ZBlk1.CHUNKSIZE)
    ap.add_argument("--no-zeo", action="store_true")
    args = ap.parse_args()
    kinds = ["filestorage"] + ([] if args.no_zeo else ["zeo"])
    cols = ["fill s", "fill MiB", "small ms/txn", "small KiB/txn", "read MB/s",
            "append ms/txn", "append KiB/txn", "read appended MB/s"]
    print(f"{args.mib} MiB file, 2 MiB blocks, ZBlk1 chunks of {args.chunk} bytes\n")
    print("| storage | format | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for kind in kinds:
        for fmt in ("ZBlk0", "ZBlk1", "auto"):
            r = run(kind, fmt, args.mib, args.chunk)
            print(f"| {kind} | {fmt} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
