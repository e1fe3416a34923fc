"""The bigfile-wendelin-alias distribution (crates/bigfile-python/wendelin-alias):
wendelin.core's module paths as aliases of bigfile's.

It is never on this process's path (bigfile's own tests must not lean on
it): ``cargo xtask test`` installs it into a directory of the venv named by
BIGFILE_WENDELIN_ALIAS, and the programs here that use it run in child
processes with that directory on PYTHONPATH. Run by hand without the
variable, the fixture installs it the same way into a temporary directory.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import transaction
import ZODB
from ZODB.broken import Broken
from ZODB.FileStorage import FileStorage

from bigfile.bigarray import ArrayRef
from bigfile.bigarray.array_zodb import ZBigArray
from bigfile.compat import DB as CompatDB
from bigfile.zodbutil import LivePersistent

ALIAS_SRC = Path(__file__).resolve().parents[1] / "wendelin-alias"


def pip_install(target, *args, python=sys.executable):
    cmd = [sys.executable, "-m", "pip"]
    if python != sys.executable:
        cmd += ["--python", str(python)]
    cmd += ["install", "--no-deps", "--no-index", "--disable-pip-version-check", *args, str(ALIAS_SRC)]
    if target is not None:
        cmd[-1:-1] = ["--target", str(target)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def alias_path(tmp_path_factory):
    path = os.environ.get("BIGFILE_WENDELIN_ALIAS")
    if not path:
        path = str(tmp_path_factory.mktemp("alias"))
        done = pip_install(path)
        assert done.returncode == 0, done.stderr
    assert (Path(path) / "wendelin" / "__init__.py").exists(), path
    return path


def run(alias_path, code, extra_path=(), **env):
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join([alias_path, *extra_path])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=full_env
    )


class RecordingDB(CompatDB):
    """bigfile.compat.DB recording the (module, name) of every global the
    database's records name."""

    def __init__(self, *args, **kw):
        self.globals_named = set()
        super().__init__(*args, **kw)

    def classFactory(self, connection, modulename, globalname):
        self.globals_named.add((modulename, globalname))
        return super().classFactory(connection, modulename, globalname)


WRITE = """
    import os
    import numpy as np
    import transaction
    from wendelin.bigarray import ArrayRef
    from wendelin.bigarray.array_zodb import ZBigArray
    from wendelin.bigfile.file_zodb import ZBigFile
    from wendelin.lib.zodb import LivePersistent, dbclose, dbopen

    root = dbopen(os.environ["DB"])
    root["a"] = a = ZBigArray((0, 4), np.int32, blksize=4096)
    root["f"] = f = ZBigFile(4096, "ZBlk1")
    transaction.commit()
    a.append(np.arange(4000, dtype=np.int32).reshape(-1, 4))
    with f.fileh_open() as fh, fh.mmap(0, 1) as vma:
        memoryview(vma)[:3] = b"abc"
        transaction.commit()
    root["ref"] = ArrayRef(a[10:20, ::-1])
    root["live"] = LivePersistent()
    transaction.commit()
    dbclose(root)
"""


def read_back(path):
    """Load everything with bigfile.compat.DB (in this process, without the
    alias); the values and the globals the records name."""
    db = RecordingDB(FileStorage(path))
    try:
        c = db.open(transaction.TransactionManager())
        root = c.root()
        a, ref, live = root["a"], root["ref"], root["live"]
        assert type(a) is ZBigArray and type(ref) is ArrayRef and type(live) is LivePersistent
        assert ref.root is a
        values = (a[...].copy(), ref.deref().copy())
        with root["f"].fileh_open() as fh, fh.mmap(0, 1) as vma, memoryview(vma) as m:
            values += (bytes(m[:4]),)
        c.close()
    finally:
        db.close()
    return values, db.globals_named


def test_alias_not_on_this_process_path():
    assert importlib.util.find_spec("wendelin") is None


def test_program_for_wendelin_core_writes_its_module_paths(tmp_path, alias_path):
    path = str(tmp_path / "w.fs")
    done = run(alias_path, WRITE, DB=path)
    assert done.returncode == 0, done.stderr
    (arr, view, head), named = read_back(path)
    assert np.array_equal(arr, np.arange(4000, dtype=np.int32).reshape(-1, 4))
    assert np.array_equal(view, arr[10:20, ::-1]) and head == b"abc\0"
    ours = {(m, n) for m, n in named if m.split(".")[0] in ("wendelin", "bigfile")}
    assert ours == {
        ("wendelin.bigarray.array_zodb", "ZBigArray"),
        ("wendelin.bigarray", "ArrayRef"),
        ("wendelin.bigfile.file_zodb", "ZBigFile"),
        ("wendelin.bigfile.file_zodb", "ZBlk0"),  # the array's full blocks ("auto")
        ("wendelin.bigfile.file_zodb", "ZBlk1"),
        ("wendelin.bigfile.file_zodb", "ZData"),
        ("wendelin.lib.zodb", "LivePersistent"),
    }


def test_wendelin_database_loads_with_plain_zodb_db(tmp_path, alias_path):
    path = str(tmp_path / "w.fs")
    assert run(alias_path, WRITE, DB=path).returncode == 0
    done = run(
        alias_path,
        """
        import os
        import numpy as np
        import transaction
        import ZODB
        from ZODB.FileStorage import FileStorage
        import bigfile.bigarray.array_zodb

        db = ZODB.DB(FileStorage(os.environ["DB"]))
        root = db.open().root()
        a = root["a"]
        assert type(a) is bigfile.bigarray.array_zodb.ZBigArray, type(a)
        assert np.array_equal(root["ref"].deref(), a[10:20, ::-1])
        a[0, 0] = -1
        a.append(np.full((1, 4), 7, np.int32))
        transaction.commit()
        db.close()
        print("ok", a.shape)
        """,
        DB=path,
    )
    assert done.returncode == 0 and done.stdout.split() == ["ok", "(1001,", "4)"], done.stderr
    (arr, _, _), named = read_back(path)
    assert arr[0, 0] == -1 and list(arr[-1]) == [7] * 4
    assert not any(m.startswith("bigfile") for m, _ in named)  # written back under wendelin.core's paths


def test_without_alias_plain_zodb_db_sees_broken_objects(tmp_path, alias_path):
    path = str(tmp_path / "w.fs")
    assert run(alias_path, WRITE, DB=path).returncode == 0
    db = ZODB.DB(FileStorage(path))
    try:
        assert isinstance(db.open(transaction.TransactionManager()).root()["a"], Broken)
    finally:
        db.close()


def test_refuses_wendelin_core(tmp_path, alias_path):
    """The build refuses an environment with wendelin.core installed, and
    the package refuses to be imported next to it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    fake = Path(purelib) / "wendelin.core-2.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: wendelin.core\nVersion: 2.0\n")
    done = pip_install(None, python=python)
    assert done.returncode != 0
    assert "wendelin.core 2.0 is installed" in done.stdout + done.stderr
    assert not (Path(purelib) / "wendelin").exists()

    done = run(alias_path, "import wendelin.bigfile", extra_path=[purelib])
    assert done.returncode != 0 and "ImportError: bigfile-wendelin-alias: wendelin.core 2.0 is installed" in done.stderr
