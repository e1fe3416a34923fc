"""The hand-written stubs describe the module as it is."""

import ast
import pathlib

import bigfile
from bigfile import _bigfile

PKG = pathlib.Path(bigfile.__file__).parent


def test_py_typed_and_stub_present():
    assert (PKG / "py.typed").exists()
    assert (PKG / "_bigfile.pyi").exists()


def test_stub_names_exist_at_runtime():
    tree = ast.parse((PKG / "_bigfile.pyi").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(_bigfile, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name not in ("__buffer__", "__release_buffer__"):
                    assert hasattr(cls, item.name), f"{node.name}.{item.name}"
        elif isinstance(node, ast.FunctionDef):
            assert callable(getattr(_bigfile, node.name)), node.name
        elif isinstance(node, ast.AnnAssign):
            assert hasattr(_bigfile, node.target.id), node.target.id


def test_runtime_public_names_are_in_stub():
    text = (PKG / "_bigfile.pyi").read_text()
    for name in dir(_bigfile):
        if not name.startswith("__") and name != "_BlockBuffer":
            assert name in text, name
