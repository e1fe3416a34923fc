"""bigfile.bigarray.ArrayRef and _flatbytev (wendelin.core's semantics).

Property tests: for random chains of views (slices with any step,
transposes, reshapes that keep the memory, dtype views) of a BigArray, of a
RAMArray and of a ZBigArray reopened from a database, ArrayRef finds the
array the memory belongs to, ``deref()`` rebuilds an identical view of the
same memory, and ``lo:hi`` covers exactly the bytes the view reads.
"""

import mmap

import numpy as np
import pytest
import transaction
import ZODB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ZODB.FileStorage import FileStorage

from bigfile.bigarray import ArrayRef, BigArray, InvalidArrayRef, _flatbytev
from bigfile.bigarray.array_ram import RAMArray
from bigfile.bigarray.array_zodb import ZBigArray

from conftest import DataFile, open_conn

PS = mmap.PAGESIZE

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = [np.dtype(np.uint8), np.dtype("<u2"), np.dtype(">i4"), np.dtype("<f8"), np.dtype("V3")]


class Noise(DataFile):
    """Blocks of deterministic pseudo-random bytes: every item differs."""

    def loadblk(self, blk, buf):
        data = self.data.get(blk)
        if data is None:
            data = np.random.default_rng(blk + 1).integers(0, 256, len(buf), dtype=np.uint8).tobytes()
        buf[:] = data


def fill(a, seed):
    raw = np.random.default_rng(seed).integers(0, 256, a.nbytes, dtype=np.uint8)
    _flatbytev(a)[:] = raw


# ~~~ random views


@st.composite
def array_specs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    order = draw(st.sampled_from(["C", "F"]))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0 if ndim > 1 else 1, 24)) for _ in range(ndim))
    # several 4 KiB pages at most, so views cross page edges but examples stay quick
    while np.prod(shape) * dtype.itemsize > 6 * PS:
        shape = (shape[0] // 2,) + shape[1:]
    return shape, dtype, order


def draw_slice(draw, n):
    step = draw(st.sampled_from([1, 1, 2, 3, -1, -2, -5]))
    start = draw(st.one_of(st.none(), st.integers(-n - 2, n + 2)))
    stop = draw(st.one_of(st.none(), st.integers(-n - 2, n + 2)))
    return slice(start, stop, step)


def draw_view(draw, x):
    """A view of the ndarray `x` made by 0-4 random numpy operations that
    keep the memory (a step numpy refuses without copying is left out)."""
    for _ in range(draw(st.integers(0, 4), label="ops")):
        op = draw(st.sampled_from(["slice", "int", "transpose", "reshape", "dtype", "newaxis"]), label="op")
        try:
            if op == "slice" and x.ndim:
                idx = tuple(draw_slice(draw, n) for n in x.shape)
                x = x[idx]
            elif op == "int" and x.ndim > 1 and x.shape[0]:
                x = x[draw(st.integers(-x.shape[0], x.shape[0] - 1))]
            elif op == "transpose" and x.ndim:
                x = x.transpose(draw(st.permutations(range(x.ndim))))
            elif op == "newaxis":
                x = x[np.newaxis]
            elif op == "reshape":
                shapes = [(-1,), x.shape[::-1]]
                if x.ndim >= 2:
                    shapes.append(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
                if x.ndim and x.shape[-1] % 2 == 0:
                    shapes.append(x.shape[:-1] + (2, x.shape[-1] // 2))
                y = x.reshape(draw(st.sampled_from(shapes)))
                if not np.may_share_memory(y, x):
                    continue  # numpy had to copy (or nothing to share: empty)
                x = y
            elif op == "dtype":
                x = x.view(draw(st.sampled_from(DTYPES)))
        except (ValueError, AttributeError, TypeError):
            continue
    return x


def check_ref(v, root):
    """ArrayRef(v) refers to `root` and rebuilds `v` from exactly the bytes
    ``lo:hi`` of its memory."""
    ref = ArrayRef(v)
    assert ref.root is root
    got = ref.deref()
    assert type(got) is type(v)
    assert (got.shape, got.strides, got.dtype) == (v.shape, v.strides, v.dtype)
    assert got.tobytes() == v.tobytes()
    # the same reference again from the rebuilt view
    again = ArrayRef(got)
    assert again.root is root
    assert (again.lo, again.hi, again.z0) == (ref.lo, ref.hi, ref.z0)
    flat = _flatbytev(root)
    assert 0 <= ref.lo <= ref.hi <= len(flat)
    if v.size:
        # exactly the bytes the view reads: from its lowest to its highest
        lows = [s * (n - 1) for n, s in zip(v.shape, v.strides) if s < 0]
        highs = [s * (n - 1) for n, s in zip(v.shape, v.strides) if s > 0]
        assert ref.hi - ref.lo == sum(highs) - sum(lows) + v.itemsize
        # and nothing else: garbage outside lo:hi changes nothing
        for junk in (0x00, 0xFF):
            copy = np.full(len(flat), junk, np.uint8)
            copy[ref.lo : ref.hi] = flat[ref.lo : ref.hi]
            ref2 = ArrayRef(v)
            ref2.root = copy
            assert ref2.deref().tobytes() == v.tobytes()
    del flat
    return ref, got


@SETTINGS
@given(data=st.data(), spec=array_specs(), ram=st.booleans())
def test_views_of_bigarray_and_ramarray(data, spec, ram):
    shape, dtype, order = spec
    fh = None
    if ram:
        a = RAMArray(shape, dtype, order)
    else:
        fh = Noise(PS).fileh_open()
        a = BigArray(shape, dtype, fh, order)
    try:
        fill(a, 7)
        v = draw_view(data.draw, a[...])
        ref, got = check_ref(v, a)
        if v.size:
            # deref views the array's memory, not a copy
            first = (slice(0, 1),) * v.ndim
            vbyte, gbyte = (x[first].reshape(-1).view(np.uint8) for x in (v, got))
            old = int(vbyte[0])
            gbyte[0] = old ^ 0xFF
            assert vbyte[0] == old ^ 0xFF
            del vbyte, gbyte
        del v, got, ref
    finally:
        del a
        if fh is not None:
            fh.close()


# ~~~ ZBigArray, reopened from the database


@pytest.fixture(scope="module")
def zdb(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("aref") / "a.fs")
    db = ZODB.DB(FileStorage(path))
    tm = transaction.TransactionManager()
    c = db.open(tm)
    for i, (shape, dtype, order) in enumerate([((7, 300), "<i4", "C"), ((5, 6, 97), "<u2", "F")]):
        c.root()[f"a{i}"] = a = ZBigArray(shape, dtype, order, blksize=PS)
        tm.commit()
        fill(a, i)
        tm.commit()
    c.close()
    db.close()
    db = ZODB.DB(FileStorage(path))
    try:
        yield db
    finally:
        db.close()


@pytest.fixture(scope="module")
def zconn(zdb):
    yield from open_conn(zdb)


@pytest.fixture
def zconn1(zdb):
    yield from open_conn(zdb)


@pytest.fixture
def zconn2(zdb):
    yield from open_conn(zdb)


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["a0", "a1"]))
def test_views_of_zbigarray_reopened(zconn, data, which):
    a = zconn.root()[which]
    v = draw_view(data.draw, a[...])
    check_ref(v, a)


def test_arrayref_stored_in_database_derefs_in_another_connection(zconn1, zconn2):
    a = zconn1.root()["a0"]
    views = [a[2:5, ::-3], a[3, 10:50].view("<u2")[::-5], a[...].T[10:-10:4], a.view("<u1")[1, 4:20]]
    zconn1.root()["refs"] = [ArrayRef(v) for v in views]
    want = [(v.shape, v.strides, v.dtype, v.copy()) for v in views]
    zconn1.transaction_manager.commit()
    zconn2.transaction_manager.begin()
    refs = zconn2.root()["refs"]
    for ref, (shape, strides, dtype, values) in zip(refs, want):
        assert ref.root is zconn2.root()["a0"] and ref.root is not a
        got = ref.deref()
        assert (got.shape, got.strides, got.dtype) == (shape, strides, dtype)
        assert np.array_equal(got, values)
    del zconn1.root()["refs"]
    zconn1.transaction_manager.commit()


# ~~~ fixed cases, plain ndarrays


def test_ndarray_roots_as_wendelin():
    data = np.arange(256, dtype=np.uint8)
    ref = ArrayRef(data)
    assert (ref.root is data, ref.lo, ref.hi, ref.z0) == (True, 0, 256, 0)
    assert (ref.shape, ref.stridev, ref.dtype, ref.atype) == ((256,), (1,), data.dtype, np.ndarray)

    ref = ArrayRef(data[140:100:-1])
    assert (ref.root is data, ref.lo, ref.hi, ref.z0) == (True, 101, 141, 39)
    assert np.array_equal(ref.deref(), data[140:100:-1])

    ref = ArrayRef(data.view(np.uint32)[3:5])
    assert (ref.root is data, ref.lo, ref.hi, ref.z0) == (True, 12, 20, 0)

    # a top-level array whose memory runs backwards
    rdata = np.asarray(memoryview(data[::-1]))
    assert rdata.strides == (-1,) and not isinstance(rdata.base, np.ndarray)
    ref = ArrayRef(rdata[100:140])
    assert (ref.root is rdata, ref.lo, ref.hi, ref.z0) == (True, 116, 156, 39)

    # numpy's proxies in the chain of bases (as_strided's)
    s = np.lib.stride_tricks.as_strided(data[10:], (4, 3), (20, 2))
    ref = ArrayRef(s)
    assert ref.root is data and (ref.lo, ref.hi) == (10, 75)
    assert np.array_equal(ref.deref(), s)

    m = data.reshape(16, 16).view(np.matrix)[2:4]
    got = ArrayRef(m).deref()
    assert type(got) is np.matrix and np.array_equal(got, m)


def test_empty_arrays():
    data = np.arange(100, dtype=np.uint8)
    ref = ArrayRef(data[50:40])  # numpy leaves the pointer at the start
    assert (ref.lo, ref.hi, ref.z0) == (0, 1, 0)
    assert ref.deref().shape == (0,)
    # nothing to point into: a reference to no bytes
    b = BigArray((0, 4), np.int32, None)  # nothing to map: no handle needed
    for e, root in ((np.zeros(0, np.float64), None), (np.zeros((3, 0)), None), (b[...], b), (b[:, 1:], b)):
        ref = ArrayRef(e)
        assert ref.root is (e if root is None else root) and ref.lo == ref.hi
        got = ref.deref()
        assert (got.shape, got.dtype) == (e.shape, e.dtype)


def test_flatbytev():
    x = np.arange(24, dtype="<u2").reshape(2, 3, 4)
    f = np.asfortranarray(x)
    for v, memory in [
        (x, x.tobytes()),
        (x.T, x.tobytes()),
        (x[::-1], x.tobytes()),
        (x[:, ::-1, ::-1].transpose(2, 0, 1), x.tobytes()),
        (f, f.T.tobytes()),
        (f[::-1, :, ::-1], f.T.tobytes()),
    ]:
        flat = _flatbytev(v)
        assert flat.dtype == np.uint8 and flat.ndim == 1
        assert flat.tobytes() == memory  # in address order, whatever the view's
        assert np.shares_memory(flat, v)
    assert _flatbytev(np.array(1.5)).tobytes() == np.float64(1.5).tobytes()
    with pytest.raises(ValueError, match="densely"):
        _flatbytev(x[:, ::2])
    with pytest.raises(TypeError):
        _flatbytev([1, 2, 3])


# ~~~ BigArray specifics


def test_root_of_dtype_view_and_of_ramarray():
    with Noise(PS).fileh_open() as fh:
        a = BigArray((10, 100), np.int32, fh)
        b = a.view(np.int16)
        ref = ArrayRef(b[3, 10:20])
        assert ref.root is a  # the same bytes: the array b is a view of
        assert (ref.lo, ref.hi) == (3 * 400 + 20, 3 * 400 + 40)
        assert np.array_equal(ref.deref(), b[3, 10:20])
        ref = ArrayRef(np.asarray(a)[::-1])
        assert ref.root is a and (ref.lo, ref.hi, ref.z0) == (0, 4000, 3600)
        # a view taken before a shrink reads past the array's end
        tail = a[9]
        a.resize((5, 100))
        with pytest.raises(ValueError, match="outside its 2000 bytes"):
            ArrayRef(tail)
        del b, tail, ref, a


def test_deref_maps_only_lo_hi():
    with Noise(PS).fileh_open() as fh:
        a = BigArray((1 << 30,), np.uint8, fh)  # 1 GiB: lo:hi is mapped, not the array
        v = a[(1 << 29) + 5 : (1 << 29) + 9000 : 3]
        ref = ArrayRef(v)
        assert ref.root is a and (ref.lo, ref.hi) == ((1 << 29) + 5, (1 << 29) + 9000)
        got = ref.deref()
        assert np.array_equal(got, v)
        base = got
        while isinstance(base, np.ndarray):
            base = base.base
        assert base.__array_interface__["shape"] == (ref.hi - ref.lo,)
        del base
        del v, got, a


def test_invalid_refs():
    data = np.arange(64, dtype=np.uint8)
    for attr, value, match in [
        ("lo", -1, "lo:hi"),
        ("hi", 65, "lo:hi"),
        ("z0", 40, "z0"),
        ("shape", (21,), "outside lo:hi"),
        ("stridev", (-1,), "outside lo:hi"),
        ("stridev", (1, 1), "differ in length"),
        ("shape", (-4,), "negative"),
        ("shape", ("x",), "shape"),
    ]:
        ref = ArrayRef(data[10:30])
        setattr(ref, attr, value)
        with pytest.raises(InvalidArrayRef, match=match):
            ref.deref()
    with pytest.raises(TypeError):
        ArrayRef([1, 2])
