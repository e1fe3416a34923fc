"""Reading ZODB databases written by wendelin.core.

bigfile is compatible with wendelin.core at the API level (the imports
change: ``bigfile.file_zodb``, ``bigfile.bigarray.array_zodb``), and its
ZBigFile, ZBlk0, ZBlk1, ZData and ZBigArray keep wendelin.core 2.x's
persistent state. But ZODB records name the class of each object by its
module path, and a database written by wendelin.core names
``wendelin.bigfile.file_zodb`` and ``wendelin.bigarray.array_zodb``, which
bigfile does not provide. ``class_factory`` maps those paths to bigfile's
modules; open the database with ``bigfile.compat.DB``, a ``ZODB.DB``
that uses it (on every ZODB version: ``ZODB.DB(..., class_factory=)`` is
not in all, e.g. 6.1)::

    from bigfile.compat import DB
    db = DB(storage)

Objects this database then writes are stored under bigfile's module
paths, which wendelin.core in turn cannot load. To run wendelin.core's
programs unchanged, and keep writing its module paths, install the
optional ``bigfile-wendelin-alias`` distribution instead (see the README):
with it, plain ``ZODB.DB`` loads such databases.
"""

from typing import Any, Dict

import ZODB
from ZODB.broken import find_global

__all__ = ["WENDELIN_MODULES", "class_factory", "DB"]

#: wendelin.core module path -> the bigfile module holding its classes (and
#: functions): those whose classes databases name (ZBigFile, ZBlk0, ZBlk1,
#: ZData; ZBigArray; ArrayRef; LivePersistent) and the rest a program
#: imports. The bigfile-wendelin-alias distribution aliases the same set.
WENDELIN_MODULES: Dict[str, str] = {
    "wendelin.bigfile": "bigfile",
    "wendelin.bigfile.file_file": "bigfile.file_file",
    "wendelin.bigfile.file_zodb": "bigfile.file_zodb",
    "wendelin.bigarray": "bigfile.bigarray",
    "wendelin.bigarray.array_ram": "bigfile.bigarray.array_ram",
    "wendelin.bigarray.array_zodb": "bigfile.bigarray.array_zodb",
    "wendelin.lib.zodb": "bigfile.zodbutil",
}


def class_factory(connection: Any, modulename: str, globalname: str) -> Any:
    """A ZODB class factory loading the classes of wendelin.core's ZODB
    modules from bigfile's, and every other class as ZODB does by default."""
    return find_global(WENDELIN_MODULES.get(modulename, modulename), globalname)


class DB(ZODB.DB):  # type: ignore[misc]  # ZODB has no type hints
    """A ``ZODB.DB`` whose connections load wendelin.core's classes from
    bigfile (`class_factory`); arguments as ``ZODB.DB``'s."""

    def classFactory(self, connection: Any, modulename: str, globalname: str) -> Any:
        return class_factory(connection, modulename, globalname)
