"""The build backend (PEP 517) of bigfile-wendelin-alias: a wheel of the
package ``wendelin`` in ``src/``, refused for an environment where
wendelin.core is installed.

Both distributions provide the package ``wendelin``: installed over
wendelin.core, this one would overwrite files of it (pip does not check).
pip runs the build under the interpreter it installs for, so the check
looks at that interpreter's site-packages, which build isolation removes
from ``sys.path`` but not from ``sysconfig``. (``pip install --target DIR``
installs elsewhere: there ``wendelin/__init__.py`` refuses at import.)
"""

import base64
import hashlib
import importlib.metadata
import io
import os
import site
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

NAME = "bigfile-wendelin-alias"
VERSION = "0.1.0"
SUMMARY = "wendelin.core's module paths (wendelin.bigfile, wendelin.bigarray, wendelin.lib.zodb) as aliases of bigfile's"
DIST = NAME.replace("-", "_")
HERE = Path(__file__).resolve().parent


def _installed_wendelin_core() -> Optional[importlib.metadata.Distribution]:
    dirs = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), site.getusersitepackages()}
    for dist in importlib.metadata.distributions(path=sorted(d for d in dirs if d and os.path.isdir(d))):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-").replace(".", "-")
        if name == "wendelin-core":
            return dist
    return None


def _metadata() -> bytes:
    return (
        f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\nSummary: {SUMMARY}\n"
        "License: GPL-3.0-or-later\nRequires-Python: >=3.9\n"
    ).encode()


def _sources() -> Iterator[Tuple[str, bytes]]:
    src = HERE / "src"
    for path in sorted(src.rglob("*.py")):
        yield path.relative_to(src).as_posix(), path.read_bytes()


def _zip(path: str, files: List[Tuple[str, bytes]]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)


def build_wheel(
    wheel_directory: str, config_settings: Optional[Dict[str, Any]] = None, metadata_directory: Optional[str] = None
) -> str:
    found = _installed_wendelin_core()
    if found is not None:
        raise RuntimeError(
            f"{NAME}: wendelin.core {found.version} is installed ({found.locate_file('')}): this distribution "
            "provides the same package, wendelin, and would overwrite it. Use wendelin.core itself, or "
            "uninstall it first."
        )
    info = f"{DIST}-{VERSION}.dist-info"
    wheel = f"Wheel-Version: 1.0\nGenerator: {NAME} build_alias\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files = list(_sources()) + [(f"{info}/METADATA", _metadata()), (f"{info}/WHEEL", wheel.encode())]
    record = io.StringIO()
    for name, data in files:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{name},sha256={digest},{len(data)}\n")
    record.write(f"{info}/RECORD,,\n")
    files.append((f"{info}/RECORD", record.getvalue().encode()))
    filename = f"{DIST}-{VERSION}-py3-none-any.whl"
    _zip(os.path.join(wheel_directory, filename), files)
    return filename


def build_sdist(sdist_directory: str, config_settings: Optional[Dict[str, Any]] = None) -> str:
    top = f"{DIST}-{VERSION}"
    files = [(f"src/{name}", data) for name, data in _sources()]
    files += [(name, (HERE / name).read_bytes()) for name in ("pyproject.toml", "build_alias.py", "README.md")]
    files.append(("PKG-INFO", _metadata()))
    filename = f"{top}.tar.gz"
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz") as tar:
        for name, data in files:
            member = tarfile.TarInfo(f"{top}/{name}")
            member.size, member.mode = len(data), 0o644
            tar.addfile(member, io.BytesIO(data))
    return filename
