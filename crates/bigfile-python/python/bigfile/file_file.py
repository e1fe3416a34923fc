"""BigFile stored in an OS file (compatible with ``wendelin.bigfile.file_file``).

``BigFile_File(path_or_fd, blksize)`` is a BigFile whose block n is bytes
``n*blksize .. (n+1)*blksize`` of an OS file opened read-write: loading a
block reads it (zeros past the end of the file), storing one writes it
(extending the file). Reads and writes are done natively, in Rust, without
calling Python or taking the GIL on a page fault or a writeout.

A subclass that overrides ``loadblk`` or ``storeblk`` has them called as
for any Python BigFile; ``super().loadblk(blk, buf)`` and
``super().storeblk(blk, buf)`` reach the native implementation.
``BigFile_File_PyIO`` is the same file served by Python code (``os.preadv``
and ``os.pwrite``): slower, kept for comparison (see the README's figures).
"""

import io
import os
from typing import Union

from bigfile._bigfile import FileBigFile

__all__ = ["BigFile_File", "BigFile_File_PyIO"]

PathOrFd = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]", int]


class BigFile_File(FileBigFile):
    """A BigFile over the OS file `path_or_fd` with `blksize`-byte blocks.

    `path_or_fd` is opened as ``io.FileIO(path_or_fd, "r+")``: a path must
    exist; a file descriptor is taken over and closed with ``self.f``, as
    in wendelin.core. ``self.f`` is that FileIO; the blocks go through a
    duplicate of its descriptor, so closing ``self.f`` does not stop them.
    """

    f: io.FileIO

    def __new__(cls, path_or_fd: PathOrFd, blksize: int, *args: object, **kwargs: object) -> "BigFile_File":
        f = io.FileIO(path_or_fd, "r+")
        try:
            obj = super().__new__(cls, f.fileno(), blksize, *args, **kwargs)
        except BaseException:
            f.close()
            raise
        obj.f = f
        return obj


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)
            return
        done += n


class BigFile_File_PyIO(BigFile_File):
    """`BigFile_File` whose blocks are read and written by Python code
    (``os.preadv``/``os.pwrite`` on ``self.f``), as a Python BigFile is."""

    def loadblk(self, blk: int, buf: memoryview) -> None:
        with memoryview(buf) as view:
            _pread_into(self.f.fileno(), view, blk * len(view))

    def storeblk(self, blk: int, buf: memoryview) -> None:
        with memoryview(buf) as view:
            off = blk * len(view)
            done = 0
            while done < len(view):
                done += os.pwrite(self.f.fileno(), view[done:], off + done)
