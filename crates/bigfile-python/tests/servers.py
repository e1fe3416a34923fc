"""Database servers the tests start for themselves on 127.0.0.1: a ZEO
server (runzeo on a FileStorage) and a PostgreSQL server for RelStorage.
Both run as child processes in a temporary directory and are stopped when
the tests are done. PostgreSQL refuses to run as root: as root, the
server runs as ``nobody``.

Which PostgreSQL: the one whose binaries are in ``$BIGFILE_TEST_PG_BINDIR``,
else ``pg_config --bindir``, else the newest ``/usr/lib/postgresql/*/bin``
(Debian's ``postgresql`` package), else ``initdb`` on PATH.
``python tests/servers.py postgres-bindir`` prints the one found (exit
status 1 if none): ``cargo xtask test`` installs Debian's package when it
finds none."""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

START_TIMEOUT = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(proc, port, what, log_path):
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class ZEOServer:
    """runzeo serving a FileStorage in `d`; `addr` is (host, port)."""

    def __init__(self, d):
        self.log_path = os.path.join(d, "runzeo.log")
        self.log = open(self.log_path, "wb")
        for _attempt in range(3):
            port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ZEO.runzeo", "-a", f"127.0.0.1:{port}", "-f", os.path.join(d, "data.fs")],
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
            if _wait_for_port(self.proc, port, "runzeo", self.log_path):
                self.addr = ("127.0.0.1", port)
                return
            _stop(self.proc)
        self.log.close()
        raise RuntimeError(f"runzeo did not accept connections within {START_TIMEOUT}s: " + _tail(self.log_path))

    @property
    def uri(self):
        return "zeo://%s:%d" % self.addr

    def stop(self):
        _stop(self.proc)
        self.log.close()


def _tail(path, n=2000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


def postgres_bindir():
    """The directory of PostgreSQL's server binaries (see the module docs),
    or None."""
    def ok(d):
        return d and all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "postgres"))

    env = os.environ.get("BIGFILE_TEST_PG_BINDIR")
    if env:
        return env if ok(env) else None
    try:
        d = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        if ok(d):
            return d
    except OSError:
        pass

    def version(d):
        v = d.split("/")[-2]
        return tuple(int(x) for x in v.split(".") if x.isdigit())

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if ok(d):
            return d
    initdb = shutil.which("initdb")
    if initdb:
        d = os.path.dirname(os.path.realpath(initdb))
        if ok(d):
            return d
    return None


class PostgresServer:
    """A PostgreSQL server in a directory of its own, trusting connections from
    127.0.0.1 by the superuser ``bigfile``; `uri(dbname, keep_history)`
    creates a database and gives RelStorage's URI for it."""

    USER = "bigfile"

    def __init__(self):
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError(
                "no PostgreSQL server found (initdb and postgres): install Debian's postgresql package "
                "(cargo xtask test does, as root), or name its binaries' directory in BIGFILE_TEST_PG_BINDIR"
            )
        self.bindir = bindir
        # Its own directory straight under /tmp: as root, the server runs as
        # nobody, which must own it and reach it (pytest's are private).
        self.dir = tempfile.mkdtemp(prefix="bigfile-pg-")
        self.runas = {}
        if os.geteuid() == 0:
            import pwd

            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self.runas = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        data = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "server.log")
        r = subprocess.run(
            [os.path.join(bindir, "initdb"), "-D", data, "-U", self.USER, "--auth=trust", "-E", "UTF8",
             "--no-sync"],
            capture_output=True, text=True, cwd=self.dir, **self.runas,
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}): {r.stdout[-1000:]}{r.stderr[-2000:]}")
        for _attempt in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [os.path.join(bindir, "postgres"), "-D", data, "-k", self.dir, "-h", "127.0.0.1",
                     "-p", str(self.port), "-c", "fsync=off", "-c", "max_connections=200",
                     "-c", "max_prepared_transactions=100"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, **self.runas,
                )
            if _wait_for_port(self.proc, self.port, "postgres", self.log_path) and self._ready():
                return
            _stop(self.proc)
        raise RuntimeError(f"PostgreSQL did not start within {START_TIMEOUT}s: " + _tail(self.log_path))

    def _connect(self, dbname="postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.USER, dbname=dbname)

    def _ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                self._connect().close()
                return True
            except Exception:  # the server accepts before it is ready ("starting up")
                if self.proc.poll() is not None:
                    return False
                time.sleep(0.1)
        return False

    def uri(self, dbname, keep_history):
        """RelStorage's URI of a new database `dbname`."""
        conn = self._connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{dbname}"')
        finally:
            conn.close()
        kh = "true" if keep_history else "false"
        return f"postgres://{self.USER}@127.0.0.1:{self.port}/{dbname}?keep_history={kh}"

    def activity(self):
        """The server's sessions (state, what they wait for, their query)
        and the locks not granted: for a test whose client waited too long."""
        try:
            conn = self._connect()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pid, datname, state, wait_event_type, wait_event, now() - xact_start, left(query, 200)"
                    " FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname IS NOT NULL"
                )
                rows = [" | ".join(map(str, r)) for r in cur.fetchall()]
                cur.execute(
                    "SELECT pid, locktype, relation::regclass, mode, objid FROM pg_locks WHERE NOT granted"
                )
                rows += ["waiting for a lock: " + " | ".join(map(str, r)) for r in cur.fetchall()]
            conn.close()
            return "\n".join(rows) or "(no sessions)"
        except Exception as e:  # a diagnostic must not hide the failure it explains
            return f"(PostgreSQL activity unavailable: {e!r})"

    def stop(self):
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["postgres-bindir"]:
        d = postgres_bindir()
        print(d or "none")
        sys.exit(0 if d else 1)
    sys.exit(f"usage: {sys.argv[0]} postgres-bindir")
