"""ZODB helpers of wendelin.core's ``wendelin.lib.zodb`` that programs using
its arrays call: opening and closing a database by URI, an object that
never becomes a ghost, deactivating a whole BTree.

- ``dbstoropen(uri)``: a storage for `uri`: a path (a FileStorage) or any
  URI ``zodburi`` knows, as ``bigfile.uri`` resolves them (``zeo://`` with
  ``server_sync`` on; ``postgres://`` with RelStorage installed); an
  unknown scheme or argument raises ValueError.
- ``dbopen(uri)``: the root object of a new connection of a new database on
  that storage; ``dbclose(root)`` closes the connection, the database and
  the storage.
- ``LivePersistent``: a Persistent that stays loaded once loaded
  (``_p_deactivate`` does nothing; invalidations still reload it), for
  objects whose ``_v_`` attributes must survive cache garbage collection.
- ``deactivate_btree(btree)``: turn a BTree and all its buckets and values
  into ghosts, freeing their memory.
- ``zmajor``: ZODB's major version.
"""

import importlib.metadata
from typing import Any

import ZODB
from persistent import Persistent
from ZODB.FileStorage import FileStorage

from bigfile.file_zodb import _never_ghost

__all__ = ["LivePersistent", "dbstoropen", "dbopen", "dbclose", "deactivate_btree", "zmajor"]

zmajor = int(importlib.metadata.version("ZODB").split(".")[0])


class LivePersistent(Persistent):  # type: ignore[misc]  # persistent has no type hints
    """A Persistent that never goes back to a ghost once loaded (see the
    module docs)."""

    _p_deactivate = _never_ghost


def dbstoropen(uri: str) -> Any:
    """The storage `uri` names: a path (a FileStorage), or a URI as
    ``bigfile.uri`` takes (zodburi's; ``zeo://`` with ``server_sync`` on)."""
    if "://" not in uri and not uri.startswith(("demo:", "zconfig:")):
        return FileStorage(uri)
    from bigfile.uri import resolve

    factory, _dbkw = resolve(uri)
    return factory()


def dbopen(uri: str) -> Any:
    """The root object of a connection of a new database on `uri`'s storage."""
    return ZODB.DB(dbstoropen(uri)).open().root()


def dbclose(root: Any) -> None:
    """Close the connection of `root` and its database (which closes the storage)."""
    conn = root._p_jar
    db = conn.db()
    conn.close()
    db.close()


def deactivate_btree(btree: Any) -> None:
    """Make `btree`, its inner nodes, its buckets and the persistent objects
    in them ghosts."""
    for value in btree.values():  # loads every bucket
        if isinstance(value, Persistent):
            value._p_deactivate()
    bucket = btree._firstbucket
    while bucket is not None:
        bucket, ghost = bucket._next, bucket
        ghost._p_deactivate()
    _deactivate_nodes(btree)


def _deactivate_nodes(node: Any) -> None:
    # A BTree's state, when it has children: ((child, key, child, ..., child), first bucket).
    node._p_activate()
    state = node.__getstate__()
    if state is not None and len(state) == 2:
        for child in state[0][::2]:
            if type(child) is type(node):
                _deactivate_nodes(child)
    node._p_deactivate()
