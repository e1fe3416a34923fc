"""ZODB side of `cargo xtask bench` (issue 19): the sum of a ZBigArray in a
fresh process, the path most Python users run.

Prints one `name<TAB>value` line per figure on stdout, like
python_bench.py; progress goes to stderr.

- zsum_filestorage: seconds for a fresh process (this script run again by
  `--child`) to sum a ZBigArray of uint64 (2 MiB blocks, ZBlk0) of
  `zsum_bytes` bytes over a FileStorage whose file is in the page cache:
  from the array's first access (its handle opened with the defaults)
  to the end of the sum; opening the database and its root are not timed.
- zsum_zeo: the same through a ZEO server on 127.0.0.1 started by this
  script (runzeo on the same FileStorage, as the tests start it), a fresh
  client cache.
- zsum_numpy: numpy's sum of the same values held in a numpy array.

wendelin.core (not required, not installed here) would need a storage of
its own: its records name its own classes.

There are no rows with read-ahead on and off: `ZBigFile` is never read
ahead (its loads use the application thread's ZODB connection;
ARCHITECTURE.md, "Read-ahead").

    python benches/zodb_bench.py [--quick] [--data-dir DIR]
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "crates", "bigfile-python", "tests"))

from servers import ZEOServer  # noqa: E402  (the tests' server helper)

MIB = 1 << 20
BLK = 2 * MIB


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def values(n):
    """The array's words: distinct, none zero (a hole would read as zeros)."""
    return (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


def make_storage(path, size):
    """A FileStorage at `path` holding root['a'], a ZBigArray of `size` bytes."""
    import transaction
    import ZODB
    from ZODB.FileStorage import FileStorage

    from bigfile import file_zodb
    from bigfile.bigarray.array_zodb import ZBigArray

    marker = path + ".done"
    if os.path.exists(marker) and os.path.exists(path):
        return
    for stale in (path, path + ".index", path + ".lock", path + ".tmp"):
        if os.path.exists(stale):
            os.remove(stale)
    log(f"writing {path}")
    file_zodb.ZBlk_fmt_write = "ZBlk0"
    db = ZODB.DB(FileStorage(path))
    try:
        conn = db.open()
        conn.root()["a"] = a = ZBigArray((size // 8,), np.uint64)
        transaction.commit()
        chunk = 32 * MIB // 8
        n = size // 8
        for i in range(0, n, chunk):
            a[i : i + chunk] = values(n)[i : i + chunk]
        transaction.commit()
        conn.close()
    finally:
        db.close()
    open(marker, "w").close()


def warm(path):
    """Read the file once: the page cache holds it."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * MIB):
            pass


def fresh_sum(kind, where):
    """Seconds and sum of a child summing the array: `kind` filestorage
    (`where` the path) or zeo (`where` host:port)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, where],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), int(out[1])


def child(kind, where):
    """In the fresh process: open the database, time the array's sum."""
    import ZODB

    if kind == "filestorage":
        from ZODB.FileStorage import FileStorage

        db = ZODB.DB(FileStorage(where, read_only=True))
    elif kind == "zeo":
        import ZEO

        host, port = where.rsplit(":", 1)
        db = ZEO.DB((host, int(port)), wait_timeout=30, read_only=True)
    else:
        raise SystemExit(f"unknown child kind {kind}")
    conn = db.open()
    a = conn.root()["a"]
    t = time.perf_counter()
    s = int(a[:].sum(dtype=np.uint64))
    dt = time.perf_counter() - t
    print(dt, s)
    conn.close()
    db.close()


def mean_of(runs, expect, name):
    for _, s in runs:
        if s != expect:
            raise SystemExit(f"{name}: sum {s}, expected {expect}")
    return sum(t for t, _ in runs) / len(runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-dir", default="target/bench-data")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "WHERE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    os.makedirs(args.data_dir, exist_ok=True)
    size = 256 * MIB
    passes = 3 if args.quick else 5
    # A directory of its own: the ZEO server serves `<dir>/data.fs`.
    d = os.path.join(args.data_dir, f"zsum-{size // MIB}M")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "data.fs")
    make_storage(path, size)
    vals = values(size // 8)
    expect = int(vals.sum(dtype=np.uint64))
    out = {"zsum_bytes": size}

    warm(path)
    log("zodb bench: ZBigArray sum over FileStorage, fresh processes")
    out["zsum_filestorage"] = mean_of(
        [fresh_sum("filestorage", path) for _ in range(passes)], expect, "filestorage"
    )
    log("zodb bench: numpy sum of the same values")
    t = time.perf_counter()
    for _ in range(passes):
        if int(vals.sum(dtype=np.uint64)) != expect:
            raise SystemExit("numpy sum differs")
    out["zsum_numpy"] = (time.perf_counter() - t) / passes

    out["zsum_zeo"] = zeo_sum(d, passes, expect)
    print("".join(f"{k}\t{v}\n" for k, v in out.items()), end="")


def zeo_sum(d, passes, expect):
    """zsum_zeo: fresh clients of a ZEO server serving `d`/data.fs."""
    log("zodb bench: ZBigArray sum through ZEO, fresh processes")
    server = ZEOServer(d)
    try:
        where = "%s:%d" % server.addr
        return mean_of([fresh_sum("zeo", where) for _ in range(passes)], expect, "zeo")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
