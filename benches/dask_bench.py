"""Dask side of `cargo xtask bench` (issue 21): the sum of a 1 GiB int64
ZBigArray (256 MiB with --quick) on a ZEO server started here on
127.0.0.1, computed

- directly, in this process, 64 MiB slices at a time (`dask_sum_direct`);
- by bigfile.dask on a LocalCluster of 1 worker process (`dask_sum_1w`) and
  of 2 worker processes (`dask_sum_2w`), one thread each, default chunks.

Prints `name<TAB>seconds per pass` on stdout (each the mean of several
passes after a first one that warms the server's page cache and, for Dask,
opens the workers' connections) and `dask_sum_bytes`. The ZEO server is
one more Python process on the same 2 cores: it serves every load.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import transaction

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "crates", "bigfile-python", "tests"))

from servers import ZEOServer  # noqa: E402  (the tests' server helper)

from bigfile.bigarray.array_zodb import ZBigArray  # noqa: E402
from bigfile.uri import open_db  # noqa: E402

MIB = 1 << 20


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def fill(uri, n):
    db = open_db(uri)
    tm = transaction.TransactionManager()
    c = db.open(tm)
    c.root()["a"] = a = ZBigArray((n,), np.int64)
    tm.commit()
    step = (64 * MIB) // 8
    for i in range(0, n, step):
        a[i : i + step] = np.arange(i, min(n, i + step), dtype=np.int64)
        tm.commit()
    c.close()
    db.close()


def sum_direct(uri, n):
    db = open_db(uri)
    c = db.open()
    a = c.root()["a"]
    step = (64 * MIB) // 8
    total = sum(int(a[i : i + step].sum()) for i in range(0, n, step))
    transaction.abort()
    c.close()
    db.close()
    return total


def timed(fn, passes):
    fn()  # warm up
    times, result = [], None
    for _ in range(passes):
        t = time.perf_counter()
        r = fn()
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
    size = (256 if args.quick else 1024) * MIB
    passes = 2 if args.quick else 3
    n = size // 8
    want = n * (n - 1) // 2

    from distributed import Client, LocalCluster

    from bigfile.dask import from_zbigarray

    with tempfile.TemporaryDirectory(dir=args.data_dir) as d:
        server = ZEOServer(d)
        try:
            uri = server.uri
            log(f"dask bench: writing a {size // MIB} MiB ZBigArray to ZEO")
            fill(uri, n)
            out = {}
            log("dask bench: sum in this process")
            out["dask_sum_direct"], got = timed(lambda: sum_direct(uri, n), passes)
            assert got == want, (got, want)
            for workers in (1, 2):
                log(f"dask bench: sum on {workers} worker process(es)")
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, memory_limit=None)
                client = Client(cluster)
                try:
                    x = from_zbigarray(uri, "a")
                    out[f"dask_sum_{workers}w"], got = timed(lambda: int(x.sum().compute()), passes)
                    assert got == want, (got, want)
                finally:
                    client.close()
                    cluster.close()
            out["dask_sum_bytes"] = size
        finally:
            server.stop()
    for k, v in out.items():
        print(f"{k}\t{v}")


if __name__ == "__main__":
    main()
