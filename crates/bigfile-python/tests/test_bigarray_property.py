"""Property test: BigArray indexing agrees with numpy on the same data.

For random shapes, orders, dtypes (itemsizes that do and do not divide the
page size) and random basic index expressions, `a[idx]` equals `ref[idx]`
(value, shape, dtype, strides) and `a[idx] = v` changes exactly what
`ref[idx] = v` changes. Arrays span several 4 KiB pages so selections cross
page edges in every direction.
"""

import mmap

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bigfile.bigarray import BigArray

from conftest import DataFile, ExactMappings

PS = mmap.PAGESIZE

DTYPES = [
    np.dtype(np.uint8),
    np.dtype("<i4"),
    np.dtype(">f8"),
    np.dtype("c16"),
    np.dtype("S3"),
    np.dtype([("a", "<i2"), ("b", "<f8")]),  # 10 bytes, packed
]

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Blocks(DataFile):
    """Blocks of deterministic pseudo-random bytes, so every page differs."""

    def loadblk(self, blk, buf):
        data = self.data.get(blk)
        if data is None:
            data = np.random.default_rng(blk).integers(0, 256, len(buf), dtype=np.uint8).tobytes()
        buf[:] = data


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    order = draw(st.sampled_from(["C", "F"]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=24))
    # Keep arrays a few pages big at most, so examples stay quick.
    while np.prod(shape) * dtype.itemsize > 12 * PS:
        shape = shape[:-1] if len(shape) > 1 else (shape[0] // 2,)
    return shape, dtype, order


def same(got, want):
    return (
        np.shape(got) == np.shape(want)
        and np.asarray(got).dtype == np.asarray(want).dtype
        and np.asarray(got).tobytes() == np.asarray(want).tobytes()
    )


def setup(shape, dtype, order, exact):
    """A handle, a BigArray over it and an ndarray copy of the array."""
    fh = Blocks(PS).fileh_open()
    a = BigArray(shape, dtype, ExactMappings(fh) if exact else fh, order=order)
    return fh, a, np.array(a[...], order=order)


@SETTINGS
@given(data=st.data(), spec=arrays(), exact=st.booleans())
def test_getitem_matches_numpy(data, spec, exact):
    shape, dtype, order = spec
    fh, a, ref = setup(shape, dtype, order, exact)
    try:
        for _ in range(5):
            idx = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True), label="idx")
            got, want = a[idx], ref[idx]
            assert type(got) is type(want), idx
            assert same(got, want), idx
            if isinstance(got, np.ndarray) and got.size > 1:
                assert got.strides == want.strides, idx
            del got
    finally:
        del a
        fh.close()


@SETTINGS
@given(data=st.data(), spec=arrays(), exact=st.booleans())
def test_setitem_matches_numpy(data, spec, exact):
    shape, dtype, order = spec
    fh, a, ref = setup(shape, dtype, order, exact)
    try:
        for _ in range(3):
            idx = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True), label="idx")
            target_shape = np.shape(ref[idx])
            raw = data.draw(
                st.binary(min_size=int(np.prod(target_shape)) * dtype.itemsize,
                          max_size=int(np.prod(target_shape)) * dtype.itemsize),
                label="value bytes",
            )
            value = np.frombuffer(raw, dtype).reshape(target_shape)
            a[idx] = value
            ref[idx] = value
            assert same(a[...], ref), idx
    finally:
        del a
        fh.close()


@SETTINGS
@given(spec=arrays(), data=st.data(), exact=st.booleans())
def test_out_of_range_int_raises_index_error_as_numpy(spec, data, exact):
    shape, dtype, order = spec
    fh, a, ref = setup(shape, dtype, order, exact)
    try:
        axis = data.draw(st.integers(0, len(shape) - 1), label="axis")
        n = shape[axis]
        bad = data.draw(st.one_of(st.integers(n, n + 10**12), st.integers(-n - 10**12, -n - 1)), label="bad")
        idx = (slice(None),) * axis + (bad,)
        for arr in (ref, a):
            try:
                arr[idx]
            except IndexError:
                pass
            else:
                raise AssertionError(f"{type(arr).__name__}[{idx}] did not raise IndexError")
    finally:
        del a
        fh.close()
