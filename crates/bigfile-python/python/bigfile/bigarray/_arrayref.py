"""ArrayRef: a numpy array described as a view of its root array.

``ArrayRef(a)`` walks from the ndarray `a` down its chain of bases to the
array that holds the memory: the BigArray it was taken from (found through
the `Mapped` at the bottom of every view a BigArray hands out), or else the
top-level ndarray. It records that root and the view's geometry within the
root's bytes, so that ``deref()`` builds an equal view again, e.g. in
another process that has the root from a database: sending an ArrayRef to
a slice of a ZBigArray costs a database reference and a few numbers, not
the slice's data. (For a small view of a big plain ndarray the reverse
holds: the root is the big array.)

Attributes, as in wendelin.core: ``root``; ``lo``, ``hi``: the bytes of the
root's memory (in increasing address order, as `_flatbytev` gives them)
that the view reads; ``z0``: where in ``root bytes[lo:hi]`` the view's item
0 starts; ``shape``, ``stridev``, ``dtype``; ``atype``: the ndarray type
(subclass) of the view.
"""

import operator
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ._mapping import Mapped

__all__ = ["ArrayRef", "InvalidArrayRef", "_flatbytev"]


class InvalidArrayRef(Exception):
    """An ArrayRef that does not describe an array within its root's bytes
    (raised by ``deref``)."""


def _address(a: np.ndarray) -> int:
    addr: int = a.__array_interface__["data"][0]
    return addr


def _reach(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> Tuple[int, int]:
    """The bytes an array of `shape`, `strides` and `itemsize` reads, as a
    range relative to its item 0 (axes of length 0 left out)."""
    lo = hi = 0
    for n, s in zip(shape, strides):
        if n == 0:
            continue
        if s > 0:
            hi += s * (n - 1)
        else:
            lo += s * (n - 1)
    return lo, hi + itemsize


def _flatbytev(a: Any) -> np.ndarray:
    """The memory of `a` (an ndarray, or a BigArray: then mapped whole) as a
    1-d uint8 ndarray in increasing address order, without a copy. The
    ndarray's items must cover its memory densely, in any axis order and
    direction."""
    if not isinstance(a, np.ndarray):
        flat = getattr(a, "_bytes", None)
        if flat is None:
            raise TypeError(f"_flatbytev: an ndarray or a BigArray, not {type(a).__name__}")
        whole: np.ndarray = flat(0, a.nbytes)
        return whole
    x = a.view(np.ndarray)
    if x.ndim:
        # Ascending addresses along every axis, outermost axis first.
        x = x[tuple(slice(None, None, -1) if s < 0 else slice(None) for s in x.strides)]
        x = x.transpose(sorted(range(x.ndim), key=lambda i: -x.strides[i]))
    if not x.flags.c_contiguous:
        raise ValueError(f"an array of shape {a.shape} and strides {a.strides} does not cover its memory densely")
    flat_bytes: np.ndarray = x.reshape(-1).view(np.uint8)
    return flat_bytes


def _root_of(a: np.ndarray) -> Tuple[np.ndarray, Optional[Mapped]]:
    """The ndarray at the bottom of `a`'s chain of bases, and the `Mapped`
    under it if a BigArray handed it out."""
    root = a
    while True:
        base = root.base
        if isinstance(base, np.ndarray):
            root = base
        elif isinstance(base, Mapped):
            return root, base
        elif isinstance(getattr(base, "base", None), np.ndarray):
            # numpy's proxies (as_strided's DummyArray) hold the array as .base
            root = base.base
        else:
            return root, None


class ArrayRef:
    """A reference to the numpy array `a` as a view of its root array (a
    BigArray, or the ndarray owning the memory); see the module docs."""

    root: Any
    lo: int
    hi: int
    z0: int
    shape: Tuple[int, ...]
    stridev: Tuple[int, ...]
    dtype: np.dtype
    atype: type

    def __init__(self, a: np.ndarray) -> None:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"ArrayRef: a numpy array, not {type(a).__name__}")
        base, mapped = _root_of(a)
        if mapped is not None:
            root: Any = mapped.array
            zdelta = _address(a) - mapped.origin
            size = root.nbytes
        else:
            root = base
            broot = _flatbytev(base)
            zdelta = _address(a) - _address(broot)
            size = len(broot)
        rlo, rhi = _reach(a.shape, a.strides, a.itemsize)
        lo, hi, z0 = zdelta + rlo, zdelta + rhi, -rlo
        if not 0 <= lo <= hi <= size:
            if a.size:
                raise ValueError(
                    f"ArrayRef: the array reads bytes [{lo}, {hi}) of its root, outside its {size} bytes "
                    "(a view of a BigArray taken before the array was shrunk?)"
                )
            # An empty array's pointer may be anywhere: refer to no bytes.
            lo = hi = min(max(zdelta, 0), size)
            z0 = 0
        self.root = root
        self.lo, self.hi, self.z0 = lo, hi, z0
        self.shape = a.shape
        self.stridev = a.strides
        self.dtype = a.dtype
        self.atype = type(a)

    def deref(self) -> np.ndarray:
        """The array this reference describes: a view of the root's memory
        (a BigArray root maps just the bytes ``lo .. hi``). InvalidArrayRef
        if the numbers do not describe an array within the root."""
        try:
            shape = tuple(operator.index(n) for n in self.shape)
            strides = tuple(operator.index(s) for s in self.stridev)
            lo, hi, z0 = operator.index(self.lo), operator.index(self.hi), operator.index(self.z0)
        except TypeError as e:
            raise InvalidArrayRef(f"shape {self.shape!r}, stridev {self.stridev!r}, lo/hi/z0: {e}") from None
        if len(shape) != len(strides):
            raise InvalidArrayRef(f"shape {shape} and stridev {strides} differ in length")
        if any(n < 0 for n in shape):
            raise InvalidArrayRef(f"shape {shape} has a negative dimension")
        dtype = np.dtype(self.dtype)
        root = self.root
        broot = None
        if isinstance(root, np.ndarray):
            broot = _flatbytev(root)
            size = len(broot)
        else:
            size = root.nbytes
        if not 0 <= lo <= hi <= size:
            raise InvalidArrayRef(f"lo:hi [{lo}, {hi}) is outside the root's {size} bytes")
        empty = 0 in shape
        if not (0 <= z0 <= hi - lo if empty else 0 <= z0 < hi - lo):
            raise InvalidArrayRef(f"z0 {z0} is outside lo:hi [{lo}, {hi})")
        if not empty:
            rlo, rhi = _reach(shape, strides, dtype.itemsize)
            if z0 + rlo < 0 or z0 + rhi > hi - lo:
                raise InvalidArrayRef(
                    f"shape {shape} and stridev {strides} read bytes [{lo + z0 + rlo}, {lo + z0 + rhi}) "
                    f"of the root, outside lo:hi [{lo}, {hi})"
                )
        raw = broot[lo:hi] if broot is not None else root._bytes(lo, hi)
        # numpy checks the items against the buffer too, and makes the view
        # read-only if the root's memory is.
        a = np.ndarray(shape, dtype, raw, z0, strides)
        if self.atype is not np.ndarray:
            a = a.view(type=self.atype)
        return a

    def __repr__(self) -> str:
        return (
            f"ArrayRef(root={type(self.root).__name__}, lo={self.lo}, hi={self.hi}, z0={self.z0}, "
            f"shape={self.shape}, stridev={self.stridev}, dtype={self.dtype})"
        )
