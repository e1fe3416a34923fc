"""A ZBigFile's loads keep the C heap's memory from one load to the next
(heap.rs): a ZBlk0 load allocates the record and the unpickled block and
frees both, and glibc used to give that memory back to the kernel after
every load, so the next load touched fresh pages (about 1000 page faults
per 2 MiB block, most of the time of a ZBigArray sum)."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from bigfile import file_zodb
from bigfile.bigarray.array_zodb import ZBigArray

BLK = 2 << 20
NBLK = 8

# In a fresh process (the heap's history is the test's): page faults
# taken inside each block's ZODB load and unpickling.
READER = r"""
import resource, sys
import numpy as np
import ZODB
from ZODB.FileStorage import FileStorage
from bigfile import file_zodb

def minflt():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

faults, filling = [], [0]
load, fill = file_zodb.ZBigFile._loadblk, file_zodb._fill

def counted_load(self, blk, buf):
    before, filling[0] = minflt(), 0
    load(self, blk, buf)
    faults.append(minflt() - before - filling[0])

def counted_fill(buf, data):
    # The writes into the RAM page are the fault path's, not the load's.
    before = minflt()
    fill(buf, data)
    filling[0] += minflt() - before

file_zodb.ZBigFile._loadblk = counted_load
file_zodb._fill = counted_fill
db = ZODB.DB(FileStorage(sys.argv[1], read_only=True))
a = db.open().root()["a"]
print(int(a[:].sum(dtype=np.uint64)), *faults)
"""

@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc only",
)
def test_loads_reuse_the_heap(tmp_path, monkeypatch):
    monkeypatch.setattr(file_zodb, "ZBlk_fmt_write", "ZBlk0")
    path = str(tmp_path / "data.fs")
    db = ZODB.DB(FileStorage(path))
    conn = db.open()
    conn.root()["a"] = a = ZBigArray((NBLK * BLK // 8,), np.uint64)
    transaction.commit()
    a[:] = np.arange(NBLK * BLK // 8, dtype=np.uint64) | np.uint64(1)
    transaction.commit()
    expect = int(a[:].sum(dtype=np.uint64))
    conn.close()
    db.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", READER, path], check=True, capture_output=True, text=True, env=env
    ).stdout.split()
    total, faults = int(out[0]), [int(f) for f in out[1:]]
    assert total == expect
    assert len(faults) == NBLK
    # The first loads grow the heap; from then on a load that touched fresh
    # memory would take 512 faults per 2 MiB it allocated.

    assert max(faults[2:]) < 64, faults
