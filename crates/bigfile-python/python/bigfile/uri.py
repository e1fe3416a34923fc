"""Databases named by URI (zodburi's syntax), for code that runs on other
machines and must open the same database there (``bigfile.dask``)::

    from bigfile.uri import open_db
    db = open_db("zeo://dbhost:8100")                          # a ZEO server
    db = open_db("file:///srv/data.fs")                       # a FileStorage
    db = open_db("postgres://user:pw@dbhost:5432/zodb")       # RelStorage
    db = open_db("postgres://user:pw@dbhost/zodb?keep_history=false")

Schemes: ``file``, ``zeo``, ``memory``, ``zconfig``, ``demo`` (zodburi),
and ``postgres``, ``mysql``, ``oracle``, ``sqlite`` once RelStorage is
installed (``pip install "bigfile[relstorage]"``). Query arguments are
those of zodburi and of the storage, plus ZODB.DB's ``connection_*``
ones. One difference from zodburi: ``zeo://`` URIs open with
``server_sync=true`` unless they say ``server_sync=false``, so that a
transaction begun on one machine sees every commit another finished
before it (ZEO's own default lets it start on a state a few milliseconds
old).

The database is a ``bigfile.compat.DB``: a database written by
wendelin.core opens too.
"""

from typing import Any, Dict, List, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["open_db", "schemes"]


def schemes() -> List[str]:
    """The URI schemes this Python can open."""
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group="zodburi.resolvers")
    except TypeError:  # Python 3.9
        eps = entry_points().get("zodburi.resolvers", [])
    return sorted({ep.name for ep in eps})


def _zeo_with_server_sync(uri: str) -> Tuple[Any, Dict[str, Any]]:
    """zodburi's zeo:// resolver, taking ``server_sync`` too (default on)."""
    from zodburi.resolvers import ClientStorageURIResolver

    class Resolver(ClientStorageURIResolver):  # type: ignore[misc]  # zodburi has no type hints
        _int_args = ClientStorageURIResolver._int_args + ("server_sync",)

    parts = urlsplit(uri)
    query = parse_qsl(parts.query)
    if not any(k == "server_sync" for k, _ in query):
        query.append(("server_sync", "1"))
    query = [(k, {"true": "1", "false": "0"}.get(v.lower(), v)) if k == "server_sync" else (k, v) for k, v in query]
    factory, dbkw = Resolver()(urlunsplit(parts._replace(query=urlencode(query))))
    return factory, dbkw


def resolve(uri: str) -> Tuple[Any, Dict[str, Any]]:
    """(storage factory, ZODB.DB keyword arguments) for `uri`; ValueError
    for a URI no installed resolver knows, before anything is opened."""
    if not isinstance(uri, str):
        raise TypeError(f"a database URI is a str, not {type(uri).__name__}")
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    known = schemes()
    if scheme not in known:
        hint = " (postgres, mysql, oracle, sqlite: install RelStorage)" if "postgres" not in known else ""
        raise ValueError(f"database URI {uri!r}: unknown scheme {scheme!r}; known: {', '.join(known)}{hint}")
    import zodburi

    try:
        if scheme == "zeo":
            factory, raw = _zeo_with_server_sync(uri)
            return factory, zodburi._get_dbkw(raw)
        factory, dbkw = zodburi.resolve_uri(uri)
        return factory, dbkw
    except KeyError as e:  # zodburi's UnknownDatabaseKeywords
        raise ValueError(f"database URI {uri!r}: {e.args[0]}") from None


def open_db(uri: str, **kw: Any) -> Any:
    """A ``bigfile.compat.DB`` on the database `uri` names (see the module
    docs); `kw` are ``ZODB.DB`` arguments, overriding the URI's."""
    from bigfile.compat import DB

    factory, dbkw = resolve(uri)
    dbkw.update(kw)
    return DB(factory(), **dbkw)
