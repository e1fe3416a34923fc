import mmap
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from bigfile import RAM, BigFile

PS = mmap.PAGESIZE


def uffd_ram(budget=None):
    """A RAM on the userfaultfd backend. Where the process may not have it
    (not root, vm.unprivileged_userfaultfd=0) these tests are skipped, unless
    BIGFILE_REQUIRE_UFFD is set (as `cargo xtask test` does): then they fail."""
    try:
        return RAM(f"memfd,pagesize={PS}", budget=budget, fault_backend="userfaultfd")
    except RuntimeError as e:
        if os.environ.get("BIGFILE_REQUIRE_UFFD"):
            raise
        pytest.skip(f"userfaultfd not available: {e}")


class DataFile(BigFile):
    """Blocks in a dict; block n starts as all bytes n; counts calls."""

    def __new__(cls, blksize=PS, **kw):
        obj = BigFile.__new__(cls, blksize)
        obj.data = {}
        obj.loads = []
        obj.stores = []
        obj.lock = threading.Lock()
        return obj

    def loadblk(self, blk, buf):
        with self.lock:
            self.loads.append(blk)
        data = self.data.get(blk)
        if data is None:
            buf[:] = bytes([blk & 0xFF]) * len(buf)
        else:
            buf[:] = data

    def storeblk(self, blk, buf):
        with self.lock:
            self.stores.append(blk)
        self.data[blk] = bytes(buf)


class ExactMappings:
    """A BigFileH stand-in without `mmap_cached`: a BigArray over it maps
    exactly the pages it computes, so a page range too small fails instead
    of being hidden by the mapping cache's wider windows."""

    def __init__(self, fh):
        self.blksize = fh.blksize
        self.mmap = fh.mmap


def pytest_sessionstart(session):
    """The userfaultfd pass of `cargo xtask test` (BIGFILE_FAULTS=userfaultfd,
    BIGFILE_REQUIRE_UFFD=1) must not run on signals unnoticed: the variable
    falls back, with the reason."""
    if os.environ.get("BIGFILE_REQUIRE_UFFD") and os.environ.get("BIGFILE_FAULTS") == "userfaultfd":
        from bigfile import RAM

        ram = RAM()
        if ram.fault_backend != "userfaultfd":
            raise pytest.UsageError("BIGFILE_FAULTS=userfaultfd fell back: %s" % ram.fault_backend_fallback)


@pytest.fixture
def f():
    return DataFile()


def run_py(code, *args, env=None, timeout=120):
    """Run `code` in a fresh interpreter; returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def open_conn(db):
    """Yields a connection of `db` with a transaction manager of its own,
    aborted and closed afterwards: a fixture's body, so that the close comes
    after pytest reported a failure (the report may read arrays mapping the
    connection's data, which cannot load once it is closed)."""
    import transaction

    tm = transaction.TransactionManager()
    c = db.open(tm)
    try:
        yield c
    finally:
        tm.abort()
        c.close()


# ~~~ database servers (tests/servers.py), one of each per test session


@pytest.fixture(scope="session")
def zeo_server(tmp_path_factory):
    """runzeo on a FileStorage, on 127.0.0.1."""
    from servers import ZEOServer

    server = ZEOServer(str(tmp_path_factory.mktemp("zeo")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server on 127.0.0.1, for RelStorage."""
    from servers import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def relstorage_uris(postgres_server):
    """RelStorage URIs of two databases of the server: history-preserving
    and history-free."""
    return {
        "relstorage-hp": postgres_server.uri("bigfile_hp", keep_history=True),
        "relstorage-hf": postgres_server.uri("bigfile_hf", keep_history=False),
    }
