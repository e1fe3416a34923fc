"""Dask side of `cargo xtask bench` (issue 21): the sum of a 1 GiB int64
ZBigArray (256 MiB with --quick) on a ZEO server started here on
127.0.0.1, computed

- directly, in this process, 64 MiB slices at a time (`dask_sum_direct`);
- by bigfile.dask on a LocalCluster of 1 worker process (`dask_sum_1w`) and
  of 2 worker processes (`dask_sum_2w`), one thread each, default chunks.

Prints `name<TAB>seconds per pass` on stdout (each the mean of several
passes after a first one that warms the server's page cache) and
`dask_sum_bytes`. Every pass reads cold on the client side: the direct
sum opens a new database, and the Dask passes read a new snapshot each
(a commit elsewhere in between, untimed), which the workers open new
connections for, so no pass reads pages of an earlier one. The ZEO
server is one more Python process on the same 2 cores: it serves every
load.
"""

import os
import sys
import tempfile

import numpy as np
import transaction

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "crates", "bigfile-python", "tests"))

from servers import ZEOServer  # noqa: E402  (the tests' server helper)

from python_bench import bench_args, timed  # noqa: E402

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


def tick(uri):
    """A commit elsewhere in the database: a new last transaction."""
    db = open_db(uri)
    tm = transaction.TransactionManager()
    c = db.open(tm)
    c.root()["tick"] = c.root().get("tick", 0) + 1
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


def main():
    args = bench_args()
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
            out["dask_sum_direct"], got = timed(sum_direct, uri, n, passes=passes)
            assert got == want, (got, want)
            for workers in (1, 2):
                log(f"dask bench: sum on {workers} worker process(es)")
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, memory_limit=None)
                client = Client(cluster)
                try:
                    # Each pass on a new snapshot (a commit in between):
                    # the workers open new connections, whose pages are
                    # loaded again (the direct sum opens a new database).
                    out[f"dask_sum_{workers}w"], got = timed(
                        lambda: int(from_zbigarray(uri, "a").sum().compute()), passes=passes, before=lambda: tick(uri)
                    )
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
