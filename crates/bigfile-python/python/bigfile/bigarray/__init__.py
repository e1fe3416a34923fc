"""BigArray: a numpy-like array stored in a BigFile, far bigger than RAM.

Compatible with ``wendelin.bigarray``: ``BigArray(shape, dtype, fileh,
order='C')`` lays the array out in the pages of the BigFileH `fileh`
(element bytes from file offset 0, C or Fortran order). Indexing with ints,
slices (any step), ``...`` and ``numpy.newaxis`` returns a real
``numpy.ndarray`` viewing a mapping of just the pages the selection spans;
pages are loaded when touched. Writing to such a view (or ``a[idx] = v``)
changes the handle's memory; ``fileh.dirty_writeout(...)`` stores the
changes, ``fileh.dirty_discard()`` drops them.

The whole array can be larger than RAM and than the address space; process
it in slices. ``numpy.asarray(a)`` maps it whole, which works when it fits
in the address space (RAM use stays within the handle's budget either way).

The handle can be any object providing what BigArray uses (a BigFileH, a
``ZBigFileH``, ``array_ram``'s RAM handle, a wrapper of one of these):

- ``fileh.mmap(pgoffset, pglen)``: a mapping of pages ``pgoffset ..
  pgoffset+pglen``: an object exporting a writable (or, for read-only
  data, read-only) buffer of ``pglen`` pages, with ``filerange()``
  returning its ``(pgoffset, pglen)`` and ``pagesize()`` its page size;
- optionally ``fileh.mmap_cached(pgoffset, pglen)``: the same, but the
  mapping may cover more pages (``filerange()`` says which) and be shared;
  used instead of ``mmap`` when present;
- optionally ``fileh.blksize``: the page size those calls count in; a
  handle without it maps pages of ``bigfile.bigarray.pagesize`` bytes
  (2 MiB, as ``wendelin.bigarray.pagesize``), as wendelin.core's
  ``_RAMFileH`` does. A mapping whose ``pagesize()`` differs is an error.

``ArrayRef(view)`` finds, for any numpy view of a BigArray's memory (sliced,
strided, transposed, reshaped, viewed as another dtype), the BigArray and
where the view lies in it, so the view can be stored (a ZBigArray is stored
by reference) and recreated with ``deref()``; see `ArrayRef`.

Deliberate differences from wendelin.core's BigArray:

- an int index out of range raises IndexError naming the axis (as numpy);
  bool, list and array indices (advanced indexing) raise TypeError;
- ``resize`` refuses to change any axis but the major one (the reference
  silently reinterprets the data);
- the major axis is axis 0 for order 'C' and the last axis for 'F' (the
  reference picks the axis of the largest stride, which differs only for
  shapes whose dimensions are 0 or 1);
- ``view(dtype)`` is implemented with numpy's rules (the reference raises
  NotImplementedError); ``view(type=...)`` is not;
- ``a[i]`` (all axes int-indexed) returns a numpy scalar, as numpy does.
"""

import builtins
import errno
import operator
import sys
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from ._arrayref import ArrayRef, InvalidArrayRef, _flatbytev
from ._mapping import Mapped

__all__ = ["BigArray", "ArrayRef", "InvalidArrayRef", "pagesize"]

#: The page size of handles without ``blksize`` (wendelin.core's
#: ``wendelin.bigarray.pagesize``): BigArray and ``array_ram``'s handle read
#: it at each mapping.
pagesize = 2 * 1024 * 1024

# Pickled under the public path (wendelin.core pickles wendelin.bigarray.ArrayRef).
ArrayRef.__module__ = InvalidArrayRef.__module__ = __name__

_BASIC = "ints, slices, ... and numpy.newaxis (basic indexing)"


def _shape_tuple(shape: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    dims: Tuple[int, ...]
    try:
        dims = (operator.index(shape),)  # type: ignore[arg-type]
    except TypeError:
        try:
            dims = tuple(operator.index(n) for n in shape)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}") from None
    if not dims:
        raise ValueError("a BigArray needs at least one dimension")
    if any(n < 0 for n in dims):
        raise ValueError(f"negative dimensions are not allowed: {dims}")
    return dims


def _check_dtype(dtype: Any) -> np.dtype:
    dt: np.dtype = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"a BigArray cannot hold Python objects (dtype {dt}): its items are bytes of a file")
    if dt.subdtype is not None:
        raise TypeError(f"subarray dtype {dt} is not supported: give its shape as axes of the array")
    if dt.itemsize == 0:
        raise TypeError(f"dtype {dt} has no size")
    return dt


def _page_size(fileh: Any) -> int:
    """The size of the pages `fileh` maps, in bytes (see the module docs)."""
    ps: Optional[int] = getattr(fileh, "blksize", None)
    return pagesize if ps is None else ps


def _prod(dims: Sequence[int]) -> int:
    p = 1
    for n in dims:
        p *= n
    return p


def _int_index(x: Any, axis: int, n: int) -> int:
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"BigArray supports only {_BASIC}; a bool index is a mask (advanced indexing)")
    if isinstance(x, (list, np.ndarray)) and np.ndim(x) != 0:
        raise TypeError(f"BigArray supports only {_BASIC}, not index {x!r} (advanced indexing)")
    try:
        i = operator.index(x)
    except TypeError:
        raise IndexError(f"only {_BASIC} are valid BigArray indices, not {x!r}") from None
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
    return i + n if i < 0 else i


def _slice_count(start: int, stop: int, step: int) -> int:
    if step > 0:
        return max(0, (stop - start + step - 1) // step)
    return max(0, (start - stop - step - 1) // -step)


class BigArray:
    """An array of `shape` and `dtype` stored in the pages of the BigFileH
    `bigfileh`, in `order` 'C' or 'F'. See the module docs."""

    # Names as in wendelin.core, so code that reaches for them keeps working:
    # _v_fileh is the handle (_fileh the property subclasses may override).
    _dtype: np.dtype
    _shape: Tuple[int, ...]
    _stridev: Tuple[int, ...]
    _order: str
    # For an array made by view(dtype): the array it is a view of (whose
    # bytes are its bytes), which ArrayRef refers to.
    _v_viewof: Optional["BigArray"] = None

    def __init__(self, shape: Union[int, Sequence[int]], dtype: Any, bigfileh: Any, order: str = "C") -> None:
        self._init0(shape, dtype, order)
        self._v_fileh = bigfileh

    def _init0(self, shape: Union[int, Sequence[int]], dtype: Any, order: str) -> None:
        if order not in ("C", "F"):
            raise NotImplementedError(f"order {order!r} is not supported (only 'C' and 'F')")
        dims = _shape_tuple(shape)
        dt = _check_dtype(dtype)
        if order == "C":
            strides = tuple(_prod(dims[i + 1 :]) * dt.itemsize for i in range(len(dims)))
        else:
            strides = tuple(_prod(dims[:i]) * dt.itemsize for i in range(len(dims)))
        self._shape, self._dtype, self._order, self._stridev = dims, dt, order, strides

    @property
    def _fileh(self) -> Any:
        return self._v_fileh

    @property
    def _major_axis(self) -> int:
        """The axis whose index is outermost in memory: the one that can grow."""
        return 0 if self._order == "C" else len(self._shape) - 1

    # ~~~ attributes as numpy's

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def strides(self) -> Tuple[int, ...]:
        return self._stridev

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def size(self) -> int:
        return _prod(self._shape)

    @property
    def itemsize(self) -> int:
        return self._dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self._dtype.itemsize

    @property
    def data(self) -> Any:
        raise TypeError("a BigArray has no single data buffer: index it to get ndarray views")

    def __len__(self) -> int:
        """The length of the major axis (as wendelin.core)."""
        return self._shape[self._major_axis]

    def __repr__(self) -> str:
        return f"BigArray(shape={self._shape}, dtype={self._dtype}, order={self._order!r})"

    # ~~~ indexing: a view of a mapping of the pages the selection spans

    def _view(self, idx: Any) -> Tuple[np.ndarray, bool]:
        """The ndarray view selected by `idx`, and whether numpy would give
        a scalar for it (every axis int-indexed, no ``...``)."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        ndim = len(self._shape)
        n_ellipsis = sum(1 for x in idx if x is Ellipsis)
        if n_ellipsis > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        n_axes = sum(1 for x in idx if x is not None and x is not Ellipsis)
        if n_axes > ndim:
            raise IndexError(f"too many indices for array: array is {ndim}-dimensional, but {n_axes} were indexed")
        fill = [slice(None)] * (ndim - n_axes)
        full = []
        for x in idx:
            if x is Ellipsis:
                full.extend(fill)
            else:
                full.append(x)
        if not n_ellipsis:
            full.extend(fill)

        # Walk the axes: the view's dims and strides, the byte offset of its
        # first element and the lowest and highest element offsets it touches.
        dims, strides = [], []
        first = lo = hi = 0
        empty = False
        scalar = not n_ellipsis
        axis = 0
        for x in full:
            if x is None:
                dims.append(1)
                strides.append(0)
                scalar = False
                continue
            n, st = self._shape[axis], self._stridev[axis]
            if isinstance(x, slice):
                start, stop, step = x.indices(n)
                count = _slice_count(start, stop, step)
                dims.append(count)
                strides.append(step * st)
                scalar = False
                if count == 0:
                    empty = True
                else:
                    last = start + (count - 1) * step
                    first += start * st
                    lo += min(start, last) * st
                    hi += max(start, last) * st
            else:
                i = _int_index(x, axis, n)
                first += i * st
                lo += i * st
                hi += i * st
            axis += 1

        if empty:
            # Nothing to map; numpy gives a writable empty array too. Its
            # base still names this array (for ArrayRef), at byte `first`.
            return Mapped.ndarray(np.empty(dims, self._dtype), self._ref_root(), first), False
        itemsize = self._dtype.itemsize
        view = self._mapped(self._dtype, dims, strides, first, lo, hi + itemsize, wrap=not scalar)
        return view, scalar

    def _mapped(
        self, dtype: np.dtype, dims: Sequence[int], strides: Sequence[int], first: int, lo: int, end: int, wrap: bool
    ) -> np.ndarray:
        """An ndarray of `dims`, `strides` and `dtype` whose first item is at
        byte `first` of the array's memory, mapping bytes `lo` .. `end`
        (exclusive) of the handle. With `wrap`, its base is a `Mapped`
        recording this array (for ArrayRef)."""
        fileh = self._fileh
        ps = _page_size(fileh)
        pg_lo = lo // ps
        pg_hi = (end - 1) // ps
        if (pg_hi - pg_lo + 1) * ps > sys.maxsize:
            raise MemoryError(self._too_big(end - lo))
        # A handle without the cache (a proxy, a duck-typed handle) is mapped exactly.
        mmap = getattr(fileh, "mmap_cached", None) or fileh.mmap
        try:
            vma = mmap(pg_lo, pg_hi - pg_lo + 1)
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise MemoryError(self._too_big(end - lo)) from e
            raise
        if vma.pagesize() != ps:
            raise ValueError(
                f"the handle maps pages of {vma.pagesize()} bytes, but its page size is {ps} "
                "(fileh.blksize, or bigfile.bigarray.pagesize for a handle without blksize)"
            )
        vma_start = vma.filerange()[0] * ps
        # The memoryview holds the mapping (and the mapping its handle) for
        # as long as the ndarray or a view of it lives.
        root = np.ndarray(dims, dtype, memoryview(vma), first - vma_start, strides)
        if not wrap:
            return root
        return Mapped.ndarray(root, self._ref_root(), first)

    def _ref_root(self) -> "BigArray":
        """The array ArrayRef names for views of this one's memory."""
        return self._v_viewof if self._v_viewof is not None else self

    def _bytes(self, lo: int, end: int) -> np.ndarray:
        """Bytes `lo` .. `end` (exclusive) of the array's memory (its handle's
        bytes from offset 0) as a uint8 ndarray viewing a mapping."""
        if end <= lo:
            return Mapped.ndarray(np.empty(0, np.uint8), self._ref_root(), lo)
        return self._mapped(np.dtype(np.uint8), (end - lo,), (1,), lo, lo, end, wrap=True)

    def _too_big(self, nbytes: int) -> str:
        return (
            f"cannot map {nbytes} bytes of a BigArray at once (not enough address space): "
            "process it in slices, e.g. for i in range(0, len(a), n): a[i:i+n]"
        )

    def __getitem__(self, idx: Any) -> Any:
        view, scalar = self._view(idx)
        return view[()] if scalar else view

    def __setitem__(self, idx: Any, value: Any) -> None:
        view, _ = self._view(idx)
        view[...] = value

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        """The whole array as one ndarray view (needs the address space for
        it; RAM use stays within the budget). With a different `dtype`, a
        converted copy."""
        a = self[...]
        if dtype is not None and np.dtype(dtype) != a.dtype:
            if copy is False:
                raise ValueError(f"converting a BigArray of {a.dtype} to {np.dtype(dtype)} needs a copy")
            converted: np.ndarray = a.astype(dtype)
            return converted
        return a.copy() if copy else a  # type: ignore[no-any-return]

    # ~~~ in-place growth: metadata and the touched pages only

    def resize(self, new_shape: Union[int, Sequence[int]], refcheck: bool = True) -> None:
        """Change the length of the major axis in O(1): no data moves.

        Views taken before keep their shape. Growing exposes what the file
        holds there: zeros if never written, the old items if the array was
        shrunk before (as in wendelin.core). `refcheck` is accepted for
        numpy compatibility and ignored: nothing is reallocated."""
        dims = _shape_tuple(new_shape)
        m = self._major_axis
        if len(dims) != len(self._shape) or dims[:m] + dims[m + 1 :] != self._shape[:m] + self._shape[m + 1 :]:
            raise ValueError(
                f"a BigArray can only be resized along its major axis (axis {m}): {self._shape} -> {dims}"
            )
        self._init0(dims, self._dtype, self._order)

    def append(self, values: Any) -> None:
        """Append `values` along the major axis in O(len(values)): the array
        grows and only the pages of the new tail are written. `values` must
        match the other axes; on failure (shape, dtype conversion) the array
        keeps its old shape."""
        values = np.asarray(values)
        m = self._major_axis
        if values.ndim == 0 and len(self._shape) == 1:
            values = values.reshape(1)
        if values.ndim != len(self._shape) or (
            values.shape[:m] + values.shape[m + 1 :] != self._shape[:m] + self._shape[m + 1 :]
        ):
            raise ValueError(
                "all the input array dimensions except for the concatenation axis must match exactly: "
                f"BigArray {self._shape}, values {values.shape} (major axis {m})"
            )
        n, delta = self._shape[m], values.shape[m]
        if delta == 0:
            return
        old = self._shape
        self.resize(old[:m] + (n + delta,) + old[m + 1 :])
        tail = [slice(None)] * len(old)
        tail[m] = slice(n, n + delta)
        try:
            self[tuple(tail)] = values
        except BaseException:
            self._init0(old, self._dtype, self._order)
            raise

    # ~~~ another dtype over the same bytes

    def view(self, dtype: Any = None, type: Any = None) -> "BigArray":
        """A BigArray over the same handle and bytes with another dtype, by
        numpy's rules: a dtype of another size changes the length of the
        last axis, which must be contiguous (so order 'F' only for 1-d
        arrays). Resizing the view does not resize this array."""
        if type is not None or (isinstance(dtype, builtins.type) and issubclass(dtype, np.ndarray)):
            raise NotImplementedError("BigArray.view(type=...) is not supported: index the array for ndarrays")
        new = self._dtype if dtype is None else _check_dtype(dtype)
        dims = list(self._shape)
        old_size, new_size = self._dtype.itemsize, new.itemsize
        if new_size != old_size:
            if self._order == "F" and len(dims) > 1:
                raise ValueError("To change to a dtype of a different size, the last axis must be contiguous")
            last_bytes = dims[-1] * old_size
            if new_size > old_size and last_bytes % new_size:
                raise ValueError(
                    f"When changing to a larger dtype, its size ({new_size}) must be a divisor of the total "
                    f"size in bytes of the last axis of the array ({last_bytes})"
                )
            if new_size < old_size and old_size % new_size:
                raise ValueError(
                    f"When changing to a smaller dtype, its size ({new_size}) must be a divisor of the size "
                    f"of original dtype ({old_size})"
                )
            dims[-1] = last_bytes // new_size
        v = BigArray.__new__(BigArray)
        v._init0(dims, new, self._order)
        v._v_fileh = self._fileh
        v._v_viewof = self._ref_root()
        return v
