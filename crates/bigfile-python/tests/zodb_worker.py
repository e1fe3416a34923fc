"""A ZODB client process driven by tests: one JSON command per stdin line,
one JSON reply per stdout line.

    python zodb_worker.py URI     (a database URI: zeo://, file://, postgres://)

Commands operate on ZBigArray ``root[key]`` (1-d, int64 unless said):
create, open, append, append_range, set, get, info, sum, carry, commit,
abort, begin, exit. A failing command replies {"ok": false, "error": NAME}.
"""

import faulthandler
import json
import os
import signal
import sys

import numpy as np
import transaction

from bigfile.bigarray.array_zodb import ZBigArray
from bigfile.uri import open_db


def pss_shmem_kb():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss_Shmem:"):
                return int(line.split()[1])
    return 0


def main():
    # zeo:// opens with server_sync: begin() sees every commit finished before it
    db = open_db(sys.argv[1])
    conn = db.open()
    root = conn.root()
    arrays = {}

    def arr(key, budget=None):
        a = arrays.get(key)
        if a is None:
            a = arrays[key] = root[key]
            if budget is not None:
                a.fileh_open(budget=budget)
        return a

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        key = cmd.get("key", "a")
        out = {"ok": True}
        try:
            if op == "create":
                root[key] = ZBigArray((0,), cmd.get("dtype", "int64"), blksize=cmd.get("blksize", 2 << 20))
                transaction.commit()
            elif op == "open":
                a = arr(key, cmd.get("budget"))
                out["shape"] = list(a.shape)
            elif op == "append":
                a = arr(key)
                a.append(np.full(cmd["n"], cmd["value"], a.dtype))
            elif op == "append_range":
                # values start, start+1, ... in chunks, committing each
                a = arr(key, cmd.get("budget"))
                start, n, chunk = cmd["start"], cmd["n"], cmd["chunk"]
                peak = 0
                for i in range(0, n, chunk):
                    m = min(chunk, n - i)
                    a.append(np.arange(start + i, start + i + m, dtype=a.dtype))
                    transaction.commit()
                    peak = max(peak, a._fileh.ram_stats()["resident_bytes"])
                out["peak_resident"] = peak
                out["budget"] = a._fileh.ram_stats()["budget"]
            elif op == "set":
                a = arr(key)
                a[cmd["index"]] = cmd["value"]
            elif op == "get":
                a = arr(key)
                out["values"] = [int(a[i]) for i in cmd["indices"]]
            elif op == "info":
                a = arr(key)
                out["shape"] = list(a.shape)
                out["dirty"] = a._fileh.isdirty()
            elif op == "sum":
                a = arr(key, cmd.get("budget"))
                chunk = cmd.get("chunk", 1 << 20)
                total, peak, pss = 0, 0, 0
                for i in range(0, len(a), chunk):
                    total += int(a[i : i + chunk].sum())
                    peak = max(peak, a._fileh.ram_stats()["resident_bytes"])
                    pss = max(pss, pss_shmem_kb())
                out.update(sum=total, shape=list(a.shape), peak_resident=peak, pss_shmem_kb=pss,
                           budget=a._fileh.ram_stats()["budget"])
            elif op == "carry":
                arr(key)._fileh.carry_changes()
            elif op == "commit":
                transaction.commit()
            elif op == "abort":
                transaction.abort()
            elif op == "begin":
                transaction.begin()
            elif op == "exit":
                print(json.dumps(out), flush=True)
                break
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:
            out = {"ok": False, "error": type(e).__name__, "msg": str(e)[:500]}
        print(json.dumps(out), flush=True)
    arrays.clear()
    transaction.abort()
    conn.close()
    db.close()


if __name__ == "__main__":
    sys.stdout = os.fdopen(sys.stdout.fileno(), "w", buffering=1)
    # the test's harness asks for every thread's stack when a reply is late
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    main()
