"""BigArrays bigger than the RAM budget: processing them in chunks keeps
resident memory within the budget and address space bounded."""

import numpy as np
import pytest

from bigfile import WRITEOUT_MARKSTORED, WRITEOUT_STORE
from bigfile.bigarray import BigArray
from bigfile.file_file import BigFile_File

MIB = 1 << 20
BLK = 256 << 10
BUDGET = 8 * MIB
WRITEOUT = WRITEOUT_STORE | WRITEOUT_MARKSTORED


def proc_kb(path, key):
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    pytest.fail(f"{key} not in {path}")


def shmem_bytes():
    """This process's share of shared memory mapped (memfd RAM pages)."""
    return proc_kb("/proc/self/smaps_rollup", "Pss_Shmem")


def vm_size():
    return proc_kb("/proc/self/status", "VmSize")


@pytest.fixture
def big_file(tmp_path):
    """32 MiB (4x the budget) of int64 0, 1, 2, ..., written without bigfile."""
    path = tmp_path / "big.bin"
    n = 4 * BUDGET // 8
    with open(path, "wb") as out:
        for start in range(0, n, MIB // 8):
            np.arange(start, start + MIB // 8, dtype=np.int64).tofile(out)
    return path, n


def test_sum_in_chunks_stays_within_budget(big_file):
    path, n = big_file
    base = shmem_bytes()
    with BigFile_File(path, BLK).fileh_open(budget=BUDGET) as fh:
        a = BigArray((n,), np.int64, fh)
        assert a.nbytes == 4 * BUDGET
        total = 0
        peak_resident = peak_shmem = 0
        chunk = MIB // 8  # 1 MiB of items
        for i in range(0, n, chunk):
            total += int(a[i : i + chunk].sum())
            peak_resident = max(peak_resident, fh.ram_stats()["resident_bytes"])
            peak_shmem = max(peak_shmem, shmem_bytes() - base)
        assert total == n * (n - 1) // 2
        st = fh.stats()
        # Every block was loaded once and most were reclaimed again.
        assert st["loads"] == 4 * BUDGET // BLK
        assert st["reclaims"] >= st["loads"] - BUDGET // BLK
        assert peak_resident <= BUDGET
        # The kernel agrees: mapped RAM pages never exceeded the budget
        # (plus one chunk in flight as slack for accounting granularity).
        assert peak_shmem <= BUDGET + MIB
        # Reductions over strided and reversed slices of the whole array
        # work the same way (the slice maps 32 MiB, RAM stays in budget).
        assert int(a[::-1000].sum()) == sum(range(n - 1, -1, -1000))
        assert fh.ram_stats()["resident_bytes"] <= BUDGET
        del a


def test_fill_in_chunks_with_writeout_then_reopen(tmp_path):
    path = tmp_path / "fill.bin"
    path.write_bytes(b"")
    n = 4 * BUDGET // 8
    chunk = 2 * MIB // 8
    with BigFile_File(path, BLK).fileh_open(budget=BUDGET) as fh:
        a = BigArray((0,), np.int64, fh)
        for i in range(0, n, chunk):
            a.append(np.arange(i, i + chunk, dtype=np.int64) * 3)
            # Dirty pages cannot be reclaimed: store them as we go.
            fh.dirty_writeout(WRITEOUT)
            assert fh.ram_stats()["resident_bytes"] <= BUDGET
        assert a.shape == (n,)
        del a
    assert path.stat().st_size == n * 8
    with BigFile_File(path, BLK).fileh_open(budget=BUDGET) as fh:
        a = BigArray((n,), np.int64, fh)
        assert sum(int(a[i : i + chunk].sum()) for i in range(0, n, chunk)) == 3 * n * (n - 1) // 2
        assert a[n // 2 + 1] == 3 * (n // 2 + 1)
        del a


def test_iterating_a_huge_array_keeps_address_space_bounded(tmp_path):
    """1 GiB of (never written, zero) items read in 16 MiB chunks: the
    mappings of past chunks are released, not accumulated."""
    path = tmp_path / "sparse.bin"
    path.write_bytes(b"")
    blk = 2 * MIB
    with BigFile_File(path, blk).fileh_open(budget=BUDGET) as fh:
        a = BigArray((1 << 30,), np.uint8, fh)
        chunk = 16 * MIB
        # The first load sets up the RAM's window over its pages (a large
        # reservation made once); measure from there.
        assert a[0] == 0
        start = vm_size()
        peak = 0
        for i in range(0, len(a), chunk):
            assert not a[i : i + chunk].any()
            peak = max(peak, vm_size() - start)
        assert fh.ram_stats()["resident_bytes"] <= BUDGET
        # The handle keeps at most a few recent mappings (8 windows).
        assert peak <= 8 * chunk + 64 * MIB
        fh.release_cached()
        assert vm_size() - start <= 64 * MIB
        del a


def test_scalar_loop_reuses_mappings(tmp_path):
    """Element-wise access maps a window once, not a mapping per element."""
    path = tmp_path / "small.bin"
    np.arange(100000, dtype=np.int32).tofile(path)
    with BigFile_File(path, 4096).fileh_open() as fh:
        a = BigArray((100000,), np.int32, fh)
        assert sum(int(a[i]) for i in range(0, 100000, 7)) == sum(range(0, 100000, 7))
        with open("/proc/self/maps") as f:
            mappings = sum(1 for _ in f)
        for i in range(5000):
            a[i] = -i
        with open("/proc/self/maps") as f:
            assert sum(1 for _ in f) <= mappings + 2
        assert a[4999] == -4999
        del a
