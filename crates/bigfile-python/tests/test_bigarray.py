"""bigfile.bigarray.BigArray: attributes, indexing, writes, growth, views."""

import mmap

import numpy as np
import pytest

from bigfile import WRITEOUT_MARKSTORED, WRITEOUT_STORE
from bigfile.bigarray import BigArray
from bigfile.file_file import BigFile_File

from conftest import DataFile, ExactMappings

PS = mmap.PAGESIZE
WRITEOUT = WRITEOUT_STORE | WRITEOUT_MARKSTORED


class ZeroFile(DataFile):
    """Blocks start as zeros (DataFile's start as the block number)."""

    def loadblk(self, blk, buf):
        with self.lock:
            self.loads.append(blk)
        data = self.data.get(blk)
        buf[:] = data if data is not None else bytes(len(buf))


@pytest.fixture
def fh():
    with ZeroFile(PS).fileh_open() as h:
        yield h


def same(got, want):
    """Equal shape, dtype and bytes (random bytes may be NaNs)."""
    return (
        np.shape(got) == np.shape(want)
        and np.asarray(got).dtype == np.asarray(want).dtype
        and np.asarray(got).tobytes() == np.asarray(want).tobytes()
    )


def filled(fh, shape, dtype, order="C", seed=0):
    """A BigArray and an equal ndarray with random contents."""
    ref = np.empty(shape, dtype, order=order)
    raw = ref.reshape(-1, order="A").view(np.uint8)
    raw[:] = np.random.default_rng(seed).integers(0, 256, raw.size, dtype=np.uint8)
    a = BigArray(shape, dtype, fh, order=order)
    a[...] = ref
    return a, ref


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("shape", [(10,), (7, 5), (3, 0, 4), (2, 3, 4, 5)])
def test_attributes_as_numpy(fh, shape, order):
    a = BigArray(shape, np.float32, fh, order=order)
    ref = np.zeros(shape, np.float32, order=order)
    assert a.shape == ref.shape and isinstance(a.shape, tuple)
    assert a.dtype == ref.dtype
    if ref.size:
        assert a.strides == ref.strides
    assert a.size == ref.size and a.ndim == ref.ndim
    assert a.itemsize == ref.itemsize and a.nbytes == ref.nbytes
    # len() is the major axis (wendelin.core): axis 0 in C, the last in F.
    assert len(a) == (shape[0] if order == "C" else shape[-1])
    assert a._v_fileh is fh and a._fileh is fh


def test_empty_major_axis_keeps_layout_strides(fh):
    # numpy's strides of an empty array are arbitrary; a BigArray's are
    # those of its layout, so that it can grow.
    assert BigArray((0, 5), np.int32, fh).strides == (20, 4)
    assert BigArray((5, 0), np.int32, fh, order="F").strides == (4, 20)


def test_constructor_errors(fh):
    assert BigArray(5, np.int8, fh).shape == (5,)
    with pytest.raises(ValueError, match="negative"):
        BigArray((3, -1), np.int8, fh)
    with pytest.raises(ValueError, match="at least one"):
        BigArray((), np.int8, fh)
    with pytest.raises(TypeError, match="shape"):
        BigArray((2.5,), np.int8, fh)
    with pytest.raises(TypeError, match="objects"):
        BigArray((3,), object, fh)
    with pytest.raises(TypeError, match="subarray"):
        BigArray((3,), "(2,)i4", fh)
    with pytest.raises(TypeError):
        BigArray((3,), "no such dtype", fh)
    with pytest.raises(NotImplementedError, match="order"):
        BigArray((3,), np.int8, fh, order="K")
    with pytest.raises(TypeError, match="no single data buffer"):
        BigArray((3,), np.int8, fh).data


@pytest.mark.parametrize("order", ["C", "F"])
def test_indexing_cases(fh, order):
    a, ref = filled(fh, (40, 30, 3), np.int16, order)
    cases = [
        5,
        -1,
        (3, 4, 2),
        (-40, -30, -3),
        slice(None),
        slice(None, None, -1),
        slice(35, 2, -7),
        (slice(1, 39, 5), slice(None, None, -4), 1),
        (Ellipsis, 2),
        (1, Ellipsis),
        (Ellipsis,),
        (None, 3, None, Ellipsis, None),
        (slice(100, 200),),
        (slice(10, 5),),
        (2, slice(5, 5)),
        (slice(None), 7),
        (np.int64(3), np.uint8(2)),
    ]
    for idx in cases:
        got, want = a[idx], ref[idx]
        assert type(got) is type(want), idx
        assert np.shape(got) == np.shape(want), idx
        assert same(got, want), idx
        if isinstance(got, np.ndarray) and got.size:
            assert got.strides == want.strides, idx


def test_scalar_and_zero_d_results(fh):
    a, ref = filled(fh, (4, 5), np.float64)
    assert isinstance(a[1, 2], np.float64) and a[1, 2] == ref[1, 2]
    # With an ellipsis numpy gives a 0-d array view, and so do we.
    v = a[1, 2, ...]
    assert isinstance(v, np.ndarray) and v.shape == ()
    v[...] = 7.5
    assert a[1, 2] == 7.5


def test_index_errors_as_numpy(fh):
    a = BigArray((4, 5), np.int32, fh)
    ref = np.zeros((4, 5), np.int32)
    for idx in [4, -5, (0, 5), (1, -6), (1, 2, 3), (Ellipsis, Ellipsis), 1.0, "x"]:
        with pytest.raises(IndexError):
            ref[idx]
        with pytest.raises(IndexError):
            a[idx]
        with pytest.raises(IndexError):
            a[idx] = 1
    # Advanced indexing (a copy in numpy) is refused.
    for idx in [[0, 1], np.array([0, 2]), True, (0, [1, 2])]:
        with pytest.raises(TypeError, match="basic indexing"):
            a[idx]


@pytest.mark.parametrize("exact", [False, True], ids=["cached", "exact"])
def test_page_edges(fh, exact):
    """Items of 12 bytes straddle 4 KiB page edges; slices start and end
    on both sides of them, forward and backward."""
    assert PS % 12 != 0
    dt = np.dtype([("x", "<i4"), ("y", "<f8")], align=False)
    assert dt.itemsize == 12
    n = 5 * PS // 12 + 3
    a, ref = filled(fh, (n,), dt)
    if exact:
        a = BigArray((n,), dt, ExactMappings(fh))
    edge = PS // 12  # the item straddling the first page edge
    for idx in [
        edge,
        slice(edge, edge + 1),
        slice(edge, edge - 1, -1),
        slice(0, edge + 1),
        slice(edge - 1, edge + 2),
        slice(edge + 1, None, PS // 12),
        slice(None, edge - 1, -1),
        slice(n - 1, 0, -(PS // 12)),
        slice(2 * PS // 12, 4 * PS // 12 + 1),
    ]:
        assert same(a[idx], ref[idx]), idx
    a[edge] = (-1, 2.5)
    ref[edge] = (-1, 2.5)
    assert same(a[:], ref)
    a[edge - 2 : edge + 3 : 2] = ref[edge + 10 : edge + 13]
    ref[edge - 2 : edge + 3 : 2] = ref[edge + 10 : edge + 13]
    assert same(a[:], ref)


def test_maps_only_needed_pages(fh):
    a = BigArray((100 * PS // 8,), np.uint64, fh)
    before = fh.stats()["loads"]
    assert a[50 * PS // 8 + 3] == 0
    assert fh.stats()["loads"] == before + 1
    # A strided view spans many pages but loads only the ones touched.
    v = a[::PS // 8]
    assert fh.stats()["loads"] == before + 1
    assert v[:4].sum() == 0
    assert fh.stats()["loads"] == before + 5
    del v


def test_setitem_writes_through_and_writeout(tmp_path):
    path = tmp_path / "arr.bin"
    path.write_bytes(b"")
    ref = np.arange(3000, dtype=np.int64).reshape(100, 30)
    with BigFile_File(path, PS).fileh_open() as fh:
        a = BigArray((100, 30), np.int64, fh)
        a[...] = ref
        view = a[10:20]
        view[:, 0] = -1  # through a view
        a[50, 5] = 99  # scalar assignment
        a[60:70, ::2] = np.arange(15)  # broadcast
        ref[10:20, 0] = -1
        ref[50, 5] = 99
        ref[60:70, ::2] = np.arange(15)
        assert np.array_equal(a[:], ref)
        del view
        fh.dirty_writeout(WRITEOUT)
        del a
    assert np.array_equal(np.fromfile(path, np.int64)[:3000].reshape(100, 30), ref)
    # Reopen: the data is there.
    with BigFile_File(path, PS).fileh_open() as fh:
        a = BigArray((100, 30), np.int64, fh)
        assert np.array_equal(a[:], ref)
        del a


def test_discard_drops_changes(fh):
    a, ref = filled(fh, (1000,), np.int32)
    fh.dirty_writeout(WRITEOUT)
    a[100:200] = 0
    assert a[150] == 0
    fh.dirty_discard()
    assert same(a[:], ref)


def test_asarray_and_array(fh):
    a, ref = filled(fh, (30, 20), np.float64)
    a[...] = ref = np.arange(600.0).reshape(30, 20)
    arr = np.asarray(a)
    assert isinstance(arr, np.ndarray) and np.array_equal(arr, ref)
    arr[0, 0] = 123.0  # a view, not a copy
    assert a[0, 0] == 123.0
    ref[0, 0] = 123.0
    c = np.array(a)  # copy
    c[0, 1] = -5
    assert a[0, 1] == ref[0, 1]
    f32 = np.asarray(a, dtype=np.float32)
    assert f32.dtype == np.float32 and np.allclose(f32, ref.astype(np.float32))
    assert np.array_equal(a.__array__(copy=True), ref)
    del arr
    with pytest.raises(ValueError, match="copy"):
        a.__array__(np.float32, copy=False)


def test_asarray_beyond_address_space_says_to_use_slices(fh):
    a = BigArray((1 << 50,), np.uint8, fh)  # 1 PiB
    with pytest.raises(MemoryError, match="in slices"):
        np.asarray(a)
    # Slices of it are fine, anywhere.
    assert a[(1 << 50) - 1] == 0 and a[-(1 << 20) :].sum() == 0


def test_ufuncs_and_reductions_on_slices(fh):
    a, ref = filled(fh, (200, 50), np.float64)
    a[...] = np.linspace(-3, 3, 200 * 50).reshape(200, 50)
    ref[...] = np.linspace(-3, 3, 200 * 50).reshape(200, 50)
    assert np.allclose(np.sin(a[10:90:3]), np.sin(ref[10:90:3]))
    assert np.isclose(a[:, 5].sum(), ref[:, 5].sum())
    assert np.allclose(a[::-1].mean(axis=0), ref[::-1].mean(axis=0))
    assert a[100:].max() == ref[100:].max() and a[:100].argmin() == ref[:100].argmin()
    assert np.allclose(np.cumsum(a[3]), np.cumsum(ref[3]))
    assert np.allclose(a[1:4] @ a[5:8].T, ref[1:4] @ ref[5:8].T)
    # In-place ufunc on a slice writes into the array.
    np.multiply(a[0:10], 2, out=a[0:10])
    ref[0:10] *= 2
    a[20:30] += 1
    ref[20:30] += 1
    assert np.array_equal(a[:], ref)
    assert np.sort(a[40])[0] == np.sort(ref[40])[0]


def test_views_keep_handle_and_block_close(fh):
    a, _ = filled(fh, (PS,), np.uint8)
    v = a[10:20]
    with pytest.raises(RuntimeError):
        fh.close()
    del v
    # The cached mappings are not the user's: close drops them.
    del a
    fh.close()
    assert fh.closed


def test_closed_handle(fh):
    a = BigArray((10,), np.int8, fh)
    fh.close()
    with pytest.raises(ValueError, match="closed"):
        a[0]
    with pytest.raises(ValueError, match="closed"):
        a[1:3] = 0


@pytest.mark.parametrize("order", ["C", "F"])
def test_resize(fh, order):
    a, ref = filled(fh, (6, 5, 4), np.int16, order)
    m = 0 if order == "C" else 2
    grown = list(ref.shape)
    grown[m] *= 3
    v = a[...]
    a.resize(tuple(grown))
    assert a.shape == tuple(grown)
    assert a.strides == np.zeros(grown, np.int16, order=order).strides
    # The old items are in place, the new ones zeros (never written).
    old = tuple(slice(0, n) for n in ref.shape)
    assert np.array_equal(a[old], ref)
    new = [slice(None)] * 3
    new[m] = slice(ref.shape[m], None)
    assert not a[tuple(new)].any()
    # Earlier views keep their shape.
    assert v.shape == ref.shape
    a.resize(ref.shape)
    assert np.array_equal(a[...], ref)
    bad = list(ref.shape)
    bad[1] += 1
    with pytest.raises(ValueError, match="major axis"):
        a.resize(tuple(bad))
    with pytest.raises(ValueError, match="major axis"):
        a.resize(ref.shape + (1,))
    assert a.shape == ref.shape


def test_resize_is_metadata_only(fh):
    a = BigArray((10,), np.int64, fh)
    a.resize((10**15,))  # 8 PB: no data touched
    assert a.shape == (10**15,) and len(a) == 10**15
    assert fh.stats()["loads"] == 0 and not fh.isdirty()
    assert a[10**15 - 1] == 0
    assert fh.stats()["loads"] == 1


@pytest.mark.parametrize("order", ["C", "F"])
def test_append(fh, order):
    a, ref = filled(fh, (5, 3), np.int32, order)
    m = 0 if order == "C" else 1
    tail = np.arange(6, dtype=np.int32).reshape(2, 3) if m == 0 else np.arange(10, dtype=np.int32).reshape(5, 2)
    a.append(tail)
    want = np.concatenate([ref, tail], axis=m)
    assert a.shape == want.shape and same(a[...], want)
    # Shape mismatch on another axis: ValueError, array unchanged.
    with pytest.raises(ValueError, match="dimensions"):
        a.append(np.zeros((2, 4) if m == 0 else (4, 2), np.int32))
    # A failing conversion rolls the growth back.
    with pytest.raises(ValueError):
        a.append(np.array([["x"] * want.shape[1]] if m == 0 else [["x"]] * want.shape[0]))
    assert a.shape == want.shape and same(a[...], want)
    a.append(np.zeros((0, 3) if m == 0 else (5, 0), np.int32))
    assert a.shape == want.shape


def test_append_1d_and_only_tail_touched(fh):
    a = BigArray((0,), np.float64, fh)
    a.append([1.0, 2.0])
    a.append(3)
    assert a.shape == (3,) and list(a[:]) == [1.0, 2.0, 3.0]
    fh.dirty_writeout(WRITEOUT)
    n = 10 * PS // 8
    a.resize((n,))
    loads = fh.stats()["loads"]
    a.append(np.ones(4))
    # Only the page of the tail was loaded and dirtied.
    assert fh.stats()["loads"] == loads + 1
    assert fh.dirty_blocks() == [10]
    assert list(a[-5:]) == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_resize_append_writeout_reopen(tmp_path):
    path = tmp_path / "grow.bin"
    path.write_bytes(b"")
    rows = np.arange(3 * 7, dtype=np.float32).reshape(3, 7)
    with BigFile_File(path, PS).fileh_open() as fh:
        a = BigArray((0, 7), np.float32, fh)
        for i in range(500):
            a.append(rows + i)
        a.resize((1000, 7))  # shrink
        a[700:] = -1
        fh.dirty_writeout(WRITEOUT)
        shape = a.shape
        del a
    want = np.concatenate([rows + i for i in range(500)])[:1000]
    want[700:] = -1
    with BigFile_File(path, PS).fileh_open() as fh:
        a = BigArray(shape, np.float32, fh)
        assert np.array_equal(a[:], want)
        a.append(np.full((1, 7), 5, np.float32))
        fh.dirty_writeout(WRITEOUT)
        del a
    with BigFile_File(path, PS).fileh_open() as fh:
        a = BigArray((1001, 7), np.float32, fh)
        assert np.array_equal(a[:1000], want) and (a[1000] == 5).all()
        del a


@pytest.mark.parametrize(
    "shape,old,new",
    [
        ((4, 6), np.int32, np.float32),
        ((4, 6), np.int32, np.int16),
        ((4, 6), np.int32, np.int64),
        ((4, 6), np.int32, np.uint8),
        ((10,), np.int64, np.complex128),
        ((4, 6), np.int16, "S3"),
        ((4, 5), np.int16, np.int64),
        ((4, 6), np.int16, "V3"),
    ],
)
def test_view_dtype_as_numpy(fh, shape, old, new):
    a, ref = filled(fh, shape, old)
    try:
        want = ref.view(new)
    except ValueError:
        with pytest.raises(ValueError):
            a.view(new)
        return
    v = a.view(new)
    assert isinstance(v, BigArray)
    assert v.shape == want.shape and v.dtype == want.dtype and v.strides == want.strides
    assert same(v[...], want)
    # Same bytes: a write through the view shows in the array.
    v[(0,) * len(shape)] = want[(-1,) * len(shape)]
    ref.view(new)[(0,) * len(shape)] = want[(-1,) * len(shape)]
    assert same(a[...], ref)


def test_view_rules(fh):
    a, ref = filled(fh, (4, 6), np.int32, order="F")
    assert a.view(np.float32).shape == (4, 6)
    with pytest.raises(ValueError, match="contiguous"):
        a.view(np.int16)
    assert a.view().dtype == a.dtype and a.view().shape == a.shape
    with pytest.raises(NotImplementedError):
        a.view(type=np.matrix)
    with pytest.raises(NotImplementedError):
        a.view(np.ndarray)
    with pytest.raises(TypeError, match="objects"):
        a.view(object)
    # The view has its own shape: resizing it leaves the array alone.
    b, _ = filled(fh, (10,), np.int32)
    v = b.view(np.int16)
    v.resize((40,))
    assert b.shape == (10,)
