"""bigfile.zodbutil: the helpers of wendelin.core's wendelin.lib.zodb."""

import importlib.metadata

import pytest
import transaction
from BTrees.LLBTree import LLBTree
from BTrees.LOBTree import LOBTree
from persistent import GHOST, UPTODATE, Persistent

from bigfile import zodbutil
from bigfile.zodbutil import LivePersistent, dbclose, dbopen, dbstoropen, deactivate_btree


class Item(Persistent):
    def __init__(self, n):
        self.n = n


def test_dbopen_dbclose_by_path_and_file_uri(tmp_path):
    path = str(tmp_path / "u.fs")
    root = dbopen(path)
    root["x"] = Item(5)
    transaction.commit()
    dbclose(root)
    assert root._p_jar.opened is None
    root = dbopen("file://" + path)
    try:
        assert root["x"].n == 5
    finally:
        transaction.abort()
        dbclose(root)


def test_dbopen_any_uri_bigfile_takes(zeo_server, relstorage_uris):
    """As wendelin.core's, dbopen takes the URIs zodburi knows (ZEO and
    RelStorage here, both real servers); unknown schemes and arguments are
    ValueError."""
    for uri in (zeo_server.uri, relstorage_uris["relstorage-hf"], "memory://"):
        root = dbopen(uri)
        try:
            root["dbopen"] = Item(7)
            transaction.commit()
            assert root._p_jar.db().storage.__class__.__name__ in ("ClientStorage", "RelStorage", "MappingStorage")
        finally:
            transaction.abort()
            dbclose(root)
    store = dbstoropen(zeo_server.uri)
    store.close()
    for bad in ("neo://c@m:1/x", "zeo://127.0.0.1:1?bogus=1"):
        with pytest.raises(ValueError):
            dbstoropen(bad)


def test_live_persistent_and_deactivate_btree(tmp_path):
    root = dbopen(str(tmp_path / "l.fs"))
    try:
        db = root._p_jar.db()
        root["live"] = live = LivePersistent()
        root["item"] = item = Item(1)
        root["tree"] = tree = LOBTree()
        items = [Item(i) for i in range(2000)]  # enough for inner nodes
        for i, it in enumerate(items):
            tree[i] = it
        transaction.commit()
        live._v_state = "kept"
        db.cacheMinimize()
        assert live._p_state == UPTODATE and live._v_state == "kept"
        assert item._p_state == GHOST
        assert sum(tree[i].n for i in range(2000)) == sum(range(2000))  # loads everything back
        assert all(it._p_state == UPTODATE for it in items) and tree._p_state == UPTODATE
        buckets = []
        b = tree._firstbucket
        while b is not None:
            buckets.append(b)
            b = b._next
        assert len(buckets) > 1
        deactivate_btree(tree)
        assert tree._p_state == GHOST
        assert all(it._p_state == GHOST for it in items)
        assert all(b._p_state == GHOST for b in buckets)
        assert tree[1999].n == 1999  # and loads again
    finally:
        transaction.abort()
        dbclose(root)


def test_deactivate_btree_with_inner_nodes(tmp_path):
    root = dbopen(str(tmp_path / "n.fs"))
    try:
        root["tree"] = tree = LLBTree()
        tree.update({i: i for i in range(100_000)})
        transaction.commit()
        inner = [c for c in tree.__getstate__()[0][::2] if type(c) is LLBTree]
        assert inner and all(n._p_state == UPTODATE for n in inner)
        deactivate_btree(tree)
        assert tree._p_state == GHOST and all(n._p_state == GHOST for n in inner)
        assert tree[99_999] == 99_999
    finally:
        transaction.abort()
        dbclose(root)


def test_zmajor():
    assert zodbutil.zmajor == int(importlib.metadata.version("ZODB").split(".")[0]) >= 5
