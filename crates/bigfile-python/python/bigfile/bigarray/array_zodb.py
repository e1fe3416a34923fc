"""ZBigArray: a BigArray stored in ZODB (the API and persistent state of
wendelin.core's ``wendelin.bigarray.array_zodb``; its databases load through
``bigfile.compat.class_factory``, as ZODB records name the module).

``ZBigArray(shape, dtype, order='C', blksize=2 MiB)`` is a persistent
BigArray: its shape, dtype and order are stored with it, its data in a
``ZBigFile`` (attribute ``zfile``). Everything is transactional: data
written through its views, ``resize`` and ``append`` are committed by
``transaction.commit()`` and undone by ``transaction.abort()``, and another
connection sees the new shape and data together at its next transaction.

The array must be in a ZODB connection before its data is touched: stored
under a committed root, or added with ``conn.add(a)``. Its handle
(``a._v_fileh``, a ``ZBigFileH``) is opened on first access with the
default RAM and budget; ``a.fileh_open(ram=..., budget=...)`` opens it with
others first.
"""

from typing import Any, Optional, Sequence, Union

from persistent import Persistent

from bigfile.bigarray import BigArray
from bigfile.file_zodb import ZBigFile, ZBigFileH, _invalidate_keeping_volatiles, _never_ghost

__all__ = ["ZBigArray"]


class ZBigArray(BigArray, Persistent):  # type: ignore[misc]  # persistent has no type hints
    """A persistent BigArray of `shape` and `dtype` in `order`, its data in
    a ZBigFile of `blksize`-byte blocks; see the module docs."""

    zfile: ZBigFile

    def __init__(
        self, shape: Union[int, Sequence[int]], dtype: Any, order: str = "C", blksize: int = 2 * 1024 * 1024
    ) -> None:
        Persistent.__init__(self)
        self._init0(shape, dtype, order)
        self.zfile = ZBigFile(blksize)
        self._v_fileh: Optional[ZBigFileH] = None

    def __setstate__(self, state: Any) -> None:
        Persistent.__setstate__(self, state)
        self.__dict__.setdefault("_order", "C")  # written by early wendelin.core versions without it

    # The handle lives in _v_fileh, which ZODB drops when an object becomes
    # a ghost: this object never does (its state is small), and an
    # invalidation (another connection resized it, an abort) reloads the
    # state keeping the handle, whose pages ZBigFile invalidates itself.

    _p_deactivate = _never_ghost
    _p_invalidate = _invalidate_keeping_volatiles

    def fileh_open(
        self, ram: Any = None, budget: Optional[int] = None, fault_backend: Optional[str] = None
    ) -> ZBigFileH:
        """Open the handle this array's data is accessed through, with `ram`,
        `budget` and `fault_backend` as for ``BigFile.fileh_open``; only
        before the first access (which opens one with the defaults)."""
        if self.__dict__.get("_v_fileh") is not None:
            raise ValueError("ZBigArray.fileh_open: the array's handle is already open")
        zfile = self.zfile
        if zfile._p_jar is None:
            if self._p_jar is None:
                raise ValueError(
                    "ZBigArray: the array is not in a ZODB connection; add it first "
                    "(conn.add(a), or store it under the root and commit)"
                )
            self._p_jar.add(zfile)
        fileh = self._v_fileh = zfile.fileh_open(ram=ram, budget=budget, fault_backend=fault_backend)
        return fileh

    @property
    def _fileh(self) -> ZBigFileH:
        fileh = self.__dict__.get("_v_fileh")
        if fileh is None or fileh.closed:
            self._v_fileh = None
            fileh = self.fileh_open()
        return fileh
