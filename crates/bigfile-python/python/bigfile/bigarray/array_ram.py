"""RAMArray: a BigArray that lives in RAM only (wendelin.core's
``wendelin.bigarray.array_ram``).

``RAMArray(shape, dtype, order='C')`` has the API and semantics of
``ZBigArray``, indexing, ``resize`` and ``append`` included, but its data
is in memory and is not persisted: for temporary arrays. Its handle
(`_RAMFileH`) maps an anonymous in-memory file (``memfd_create``): as for a
BigArray on a file, growing is O(1) and views taken before keep seeing the
array's memory, which a numpy array's ``resize`` (a copy) would not do.

Its memory is ordinary shared memory of the process, outside any bigfile
RAM budget; pages never written take no memory.
"""

import errno
import mmap
import os
import threading
import weakref
from typing import Any, Sequence, Tuple, Union

import numpy as np

from bigfile import bigarray
from bigfile.bigarray import BigArray

__all__ = ["RAMArray"]


class RAMArray(BigArray):
    """An array of `shape` and `dtype` (`order` 'C' or 'F') in RAM only;
    see the module docs."""

    def __init__(self, shape: Union[int, Sequence[int]], dtype: Any, order: str = "C") -> None:
        super().__init__(shape, dtype, _RAMFileH(), order)


class _RAMFileH:
    """A BigArray handle over an anonymous in-memory file: ``mmap(pgoffset,
    pglen)`` grows the file to cover the pages and maps them shared, in
    pages of ``bigfile.bigarray.pagesize`` bytes (this handle has no
    ``blksize``). As wendelin.core's: ``_fh`` is the file descriptor (write
    to it to fill the array), and ``_prot`` the protection of mappings
    made from then on (``mmap.PROT_READ`` makes them read-only)."""

    _prot = mmap.PROT_READ | mmap.PROT_WRITE

    def __init__(self) -> None:
        self._fh = os.memfd_create("bigfile-ramarray", os.MFD_CLOEXEC)
        # Mappings hold their own descriptor (Python's mmap duplicates it).
        weakref.finalize(self, os.close, self._fh)
        # growing the file and mapping are one step for concurrent callers
        self._mmapmu = threading.Lock()

    def mmap(self, pgoffset: int, pglen: int) -> "_VMA":
        ps = bigarray.pagesize
        if pgoffset < 0 or pglen <= 0:
            raise ValueError(f"_RAMFileH.mmap: pgoffset {pgoffset} must be >= 0 and pglen {pglen} > 0")
        end = (pgoffset + pglen) * ps
        with self._mmapmu:
            try:
                if os.fstat(self._fh).st_size < end:
                    os.ftruncate(self._fh, end)
                return _VMA(self._fh, pgoffset, pglen, ps, self._prot)
            except OverflowError as e:
                raise MemoryError(f"_RAMFileH: cannot map {pglen} pages at page {pgoffset}: {e}") from e
            except OSError as e:
                if e.errno in (errno.ENOMEM, errno.EFBIG, errno.EINVAL):
                    raise MemoryError(f"_RAMFileH: cannot map {pglen} pages at page {pgoffset}: {e}") from e
                raise


class _VMA(mmap.mmap):
    """A mapping of `_RAMFileH`'s file with the methods BigArray uses of a
    VMA (``filerange()``, ``pagesize()``) and its addresses."""

    _pgoffset: int
    _pglen: int
    _pagesize: int

    def __new__(cls, fd: int, pgoffset: int, pglen: int, pagesize: int, prot: int) -> "_VMA":
        vma = super().__new__(cls, fd, pglen * pagesize, flags=mmap.MAP_SHARED, prot=prot, offset=pgoffset * pagesize)
        vma._pgoffset, vma._pglen, vma._pagesize = pgoffset, pglen, pagesize
        return vma

    def filerange(self) -> Tuple[int, int]:
        return (self._pgoffset, self._pglen)

    def pagesize(self) -> int:
        return self._pagesize

    @property
    def addr_start(self) -> int:
        addr: int = np.frombuffer(self, np.uint8).__array_interface__["data"][0]
        return addr

    @property
    def addr_stop(self) -> int:
        return self.addr_start + len(self)
