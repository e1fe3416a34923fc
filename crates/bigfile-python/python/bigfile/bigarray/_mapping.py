"""The base object of the ndarrays a BigArray hands out.

An ndarray returned by indexing a BigArray views memory of one mapping of
the array's handle. Its ``base`` is a `Mapped`, which holds that mapping
(through a memoryview of it) for as long as the ndarray or any view of it
lives, and records which BigArray the memory is of and the address where
that array's byte 0 would be. `ArrayRef` walks from any view back to it.

The BigArray is recorded here, per ndarray handed out, and not on the
mapping (wendelin.core sets ``vma.pyuser``): a mapping is the handle's and
may be shared by several arrays (``fileh.mmap_cached``).
"""

from typing import Any, Dict

import numpy as np

__all__ = ["Mapped"]


class Mapped:
    """Exposes the ndarray `root` (over a memoryview of a mapping) through
    ``__array_interface__``, so ``numpy.asarray`` makes an ndarray over the
    same memory whose base is this object."""

    __slots__ = ("__array_interface__", "array", "origin", "_root")

    array: Any
    origin: int
    __array_interface__: Dict[str, Any]

    def __init__(self, root: np.ndarray, array: Any, first: int) -> None:
        iface = root.__array_interface__
        # numpy leaves out the strides of a contiguous array, which makes
        # the strides of axes of length 1 its own: keep the array's.
        iface["strides"] = root.strides
        self.__array_interface__ = iface
        self._root = root
        #: the BigArray whose bytes these are
        self.array = array
        #: address of the array's byte 0 (`first` is the byte offset of root's first item)
        self.origin = iface["data"][0] - first

    @staticmethod
    def ndarray(root: np.ndarray, array: Any, first: int) -> np.ndarray:
        """An ndarray equal to `root` whose base is a new `Mapped`."""
        view: np.ndarray = np.asarray(Mapped(root, array, first))
        if view.dtype != root.dtype:
            # The interface's descr loses the offsets of structured dtypes
            # with gaps (numpy names the gaps as fields): same bytes, so a
            # view puts the dtype back.
            view = view.view(root.dtype)
        return view
