"""BigFile stored in an OS file (compatible with ``wendelin.bigfile.file_file``).

``BigFile_File(path_or_fd, blksize)`` is a BigFile whose block n is bytes
``n*blksize .. (n+1)*blksize`` of an OS file opened read-write: loading a
block reads it (zeros past the end of the file), storing one writes it
(extending the file). Reads and writes are done natively, in Rust, without
calling Python or taking the GIL on a page fault or a writeout.

`path_or_fd` is a path (str, bytes, os.PathLike) of an existing file, or a
file descriptor open for reading and writing, which the object takes over
as ``io.FileIO(fd, "r+")`` does: it is closed when the object and every
handle opened from it are gone. Unlike wendelin.core's class there is no
``.f`` FileIO attribute: ``fileno()`` gives the descriptor, ``sync()``
flushes written blocks to stable storage.

A subclass that overrides ``loadblk`` or ``storeblk`` has them called as
for any Python BigFile; ``super().loadblk(blk, buf)`` and
``super().storeblk(blk, buf)`` reach the native implementation.
``BigFile_File_PyIO`` is the same file served by Python code (``os.preadv``
and ``os.pwrite``): slower, kept for comparison (see the README's figures).
"""

import os
from typing import TYPE_CHECKING

from bigfile._bigfile import FileBigFile

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["BigFile_File", "BigFile_File_PyIO"]


class BigFile_File(FileBigFile):
    """A BigFile over the OS file `path_or_fd` with `blksize`-byte blocks
    (see the module docs)."""


class BigFile_File_PyIO(BigFile_File):
    """`BigFile_File` whose blocks are read and written by Python code
    (``os.preadv``/``os.pwrite``), as any Python BigFile's are."""

    def loadblk(self, blk: int, buf: "WriteableBuffer") -> None:
        with memoryview(buf) as view:
            fd, off, done = self.fileno(), blk * len(view), 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], off + done)
                if n == 0:
                    view[done:] = bytes(len(view) - done)
                    return
                done += n

    def storeblk(self, blk: int, buf: "ReadableBuffer") -> None:
        with memoryview(buf) as view:
            fd, off, done = self.fileno(), blk * len(view), 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], off + done)
