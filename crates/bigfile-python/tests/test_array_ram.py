"""bigfile.bigarray.array_ram: RAMArray and its handle, and BigArray over
handles that are not BigFileHs (the handle protocol of bigfile.bigarray)."""

import mmap
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bigfile import bigarray
from bigfile.bigarray import BigArray
from bigfile.bigarray.array_ram import RAMArray, _RAMFileH

from conftest import DataFile

PS = mmap.PAGESIZE


class ZeroFile(DataFile):
    def loadblk(self, blk, buf):
        data = self.data.get(blk)
        buf[:] = data if data is not None else bytes(len(buf))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=20),
    dtype=st.sampled_from([np.uint8, np.int32, np.float64, "S3"]),
    order=st.sampled_from(["C", "F"]),
)
def test_ramarray_indexes_resizes_and_appends_as_bigarray(data, shape, dtype, order):
    """The same operations on a RAMArray and on a BigArray over a file give
    the same arrays."""
    with ZeroFile(PS).fileh_open() as fh:
        r, b = RAMArray(shape, dtype, order), BigArray(shape, dtype, fh, order)
        assert (r.shape, r.dtype, r.strides, len(r)) == (b.shape, b.dtype, b.strides, len(b))
        assert not np.asarray(r).any()  # zeros, as a new ZBigArray
        fill = np.random.default_rng(1).integers(0, 256, b.nbytes, dtype=np.uint8)
        np.asarray(r).reshape(-1, order="A").view(np.uint8)[:] = fill
        np.asarray(b).reshape(-1, order="A").view(np.uint8)[:] = fill
        for _ in range(4):
            idx = data.draw(hnp.basic_indices(r.shape, allow_newaxis=True, allow_ellipsis=True), label="idx")
            got, want = r[idx], b[idx]
            assert type(got) is type(want) and np.shape(got) == np.shape(want)
            assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
            if isinstance(got, np.ndarray):
                assert got.strides == want.strides
        m = r._major_axis
        tail = list(r.shape)
        tail[m] = data.draw(st.integers(1, 5), label="appended")
        values = np.full(tail, 7, dtype)
        r.append(values)
        b.append(values)
        assert r.shape == b.shape and np.asarray(r).tobytes() == np.asarray(b).tobytes()
        del got, want, r, b


def test_views_keep_aliasing_across_resize_and_append():
    a = RAMArray((4, 3), np.int64)
    head = a[:2]
    a.append(np.ones((5000, 3), np.int64))  # grows the file past the first page
    a[0, 0] = 42
    assert head[0, 0] == 42  # the view taken before sees the array's memory
    head[1, 2] = -1
    assert a[1, 2] == -1
    a.resize((2, 3))
    a.resize((6, 3))
    assert a[4, 0] == 1  # the old items, as a BigArray on a file
    with pytest.raises(ValueError):
        a.append(np.zeros((1, 4)))
    assert a.shape == (6, 3)


def test_ram_handle_as_wendelin():
    """wendelin.core's attributes: `_fh` is the file (write to it to fill
    the array), `_prot` the protection of later mappings."""
    fh = _RAMFileH()
    payload = np.arange(1000, dtype=np.uint32)
    os.pwrite(fh._fh, payload.tobytes(), 0)
    a = BigArray((1000,), np.uint32, fh)
    assert np.array_equal(a[...], payload)
    fh._prot = mmap.PROT_READ
    ro = BigArray((1000,), np.uint32, fh)[10:20]
    assert not ro.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        ro[0] = 1
    vma = fh.mmap(3, 2)
    assert vma.filerange() == (3, 2) and vma.pagesize() == bigarray.pagesize
    assert vma.addr_stop - vma.addr_start == len(vma) == 2 * bigarray.pagesize
    with pytest.raises(ValueError):
        fh.mmap(0, 0)


class CountingHandle:
    """Only what the handle protocol asks for: `mmap`, no `blksize`, no
    `mmap_cached`; records the calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def mmap(self, pgoffset, pglen):
        self.calls.append((pgoffset, pglen))
        return self.inner.mmap(pgoffset, pglen)


def test_handle_without_blksize_maps_pages_of_module_pagesize(monkeypatch):
    monkeypatch.setattr(bigarray, "pagesize", 64 << 10)
    h = CountingHandle(_RAMFileH())
    a = BigArray((1 << 20,), np.uint8, h)
    a[(64 << 10) - 1 : (64 << 10) + 1] = [1, 2]  # crosses one page edge
    assert h.calls == [(0, 2)]
    a[5 * (64 << 10) + 7] = 3
    assert h.calls[-1] == (5, 1)
    assert a[(64 << 10) - 1] == 1 and a[64 << 10] == 2 and a[5 * (64 << 10) + 7] == 3


def test_handle_with_blksize_maps_pages_of_its_size():
    with ZeroFile(PS).fileh_open() as fh:
        h = CountingHandle(fh)
        h.blksize = fh.blksize
        a = BigArray((10 * PS,), np.uint8, h)
        a[3 * PS + 1] = 5
        assert h.calls == [(3, 1)] and a[3 * PS + 1] == 5
        del a


def test_mapping_of_another_page_size_is_refused(monkeypatch):
    h = CountingHandle(_RAMFileH())
    a = BigArray((100,), np.uint8, h)
    a[0] = 1
    monkeypatch.setattr(h, "blksize", PS, raising=False)  # the handle now claims another size
    with pytest.raises(ValueError, match="maps pages of"):
        a[1]
