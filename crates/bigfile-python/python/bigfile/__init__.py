"""bigfile: files bigger than RAM, used as memory.

Subclass `BigFile`, implement ``loadblk(self, blk, buf)`` (fill the
writable memoryview `buf` with block `blk`) and ``storeblk(self, blk, buf)``
(store the read-only memoryview `buf` as block `blk`), open a handle with
``fileh_open()`` and map pages of it with ``mmap()``: the VMA is ordinary
writable memory (``memoryview(vma)``, ``numpy.ndarray(shape, dtype,
buffer=vma)``) whose blocks are loaded on first access. Changes are written
out with ``dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)`` or dropped
with ``dirty_discard()``.

The API is that of wendelin.core's ``wendelin.bigfile``. Submodules:
``bigfile.file_file`` (``BigFile_File``, a BigFile over an OS file, read
and written natively) and ``bigfile.bigarray`` (``BigArray``, numpy arrays
bigger than RAM; ``ArrayRef``; ``array_ram.RAMArray``), as wendelin.core's
``file_file`` and ``bigarray``; with ZODB, ``bigfile.file_zodb``,
``bigfile.bigarray.array_zodb`` and ``bigfile.zodbutil`` (wendelin.core's
``wendelin.lib.zodb``), and ``bigfile.compat`` for wendelin.core's
databases.
"""

import faulthandler as _faulthandler
import functools as _functools

from bigfile._bigfile import (
    FORKED_WORKER_STATUS,
    RAM,
    VMA,
    WRITEOUT_MARKSTORED,
    WRITEOUT_STORE,
    BigFile,
    BigFileH,
    _ensure_fault_handler_on_top,
    ram_reclaim,
)

__all__ = [
    "BigFile",
    "BigFileH",
    "VMA",
    "RAM",
    "WRITEOUT_STORE",
    "WRITEOUT_MARKSTORED",
    "FORKED_WORKER_STATUS",
    "ram_reclaim",
]


def _keep_fault_handler_on_top(fn):
    """Wrap a faulthandler function that installs or restores SIGSEGV
    handlers, so bigfile's handler goes back on top after it (chaining to
    faulthandler for faults that are not bigfile's)."""
    if getattr(fn, "_bigfile_wrapped", False):
        return fn

    @_functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            _ensure_fault_handler_on_top()

    wrapper._bigfile_wrapped = True
    return wrapper


# faulthandler.enable() replaces the SIGSEGV handler, and disable() puts
# back the one it found (maybe not ours): either would leave page faults of
# mappings to faulthandler, which would report them as crashes.
_faulthandler.enable = _keep_fault_handler_on_top(_faulthandler.enable)
_faulthandler.disable = _keep_fault_handler_on_top(_faulthandler.disable)
