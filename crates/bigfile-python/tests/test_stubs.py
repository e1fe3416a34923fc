"""The hand-written stubs describe the module as it is."""

import ast
import inspect
import pathlib
import types

import bigfile
from bigfile import _bigfile

PKG = pathlib.Path(bigfile.__file__).parent


def test_py_typed_and_stub_present():
    assert (PKG / "py.typed").exists()
    assert (PKG / "_bigfile.pyi").exists()


def _runtime_classes(tree):
    """The stub's classes that are the module's: not its typing-only ones
    (a TypedDict describes the shape of a dict the module returns)."""
    return [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and not any(isinstance(b, ast.Name) and b.id == "TypedDict" for b in node.bases)
    ]


def test_stub_names_exist_at_runtime():
    tree = ast.parse((PKG / "_bigfile.pyi").read_text())
    classes = _runtime_classes(tree)
    for node in tree.body:
        if node in classes:
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


def _stub_params(fn: ast.FunctionDef, *, drop_first: bool) -> list:
    """(kind, name, default) of a stub function's parameters."""
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + [ast.unparse(d) for d in a.defaults]
    for arg, default in zip(positional, defaults):
        out.append(("pos", arg.arg, default))
    if a.vararg:
        out.append(("*", a.vararg.arg.lstrip("_"), None))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        out.append(("kw", arg.arg, None if default is None else ast.unparse(default)))
    if a.kwarg:
        out.append(("**", a.kwarg.arg.lstrip("_"), None))
    return out[1:] if drop_first else out


def _runtime_params(obj) -> list:
    """The same, from the `__text_signature__` pyo3 generates."""
    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: "pos",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "pos",
        inspect.Parameter.VAR_POSITIONAL: "*",
        inspect.Parameter.KEYWORD_ONLY: "kw",
        inspect.Parameter.VAR_KEYWORD: "**",
    }
    sig = inspect.signature(obj)
    return [
        (
            kinds[p.kind],
            p.name.lstrip("_") if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) else p.name,
            None if p.default is p.empty else repr(p.default),
        )
        for p in sig.parameters.values()
    ]


def _is_property(fn: ast.FunctionDef) -> bool:
    return any(
        (isinstance(d, ast.Name) and d.id == "property") or (isinstance(d, ast.Attribute) and d.attr == "setter")
        for d in fn.decorator_list
    )


# Dunders whose stub signature is the protocol's, not pyo3's (`__exit__`
# takes `*exc`), or that are not methods of the class (`__buffer__`).
_PROTOCOL = {"__enter__", "__exit__", "__len__", "__buffer__", "__release_buffer__", "__repr__"}


def test_stub_signatures_match_the_module():
    """Every function and method in the stub takes the parameters (names,
    kinds, defaults) the module's own takes; every property is a property."""
    tree = ast.parse((PKG / "_bigfile.pyi").read_text())
    checked = 0
    classes = _runtime_classes(tree)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            assert _stub_params(node, drop_first=False) == _runtime_params(getattr(_bigfile, node.name)), node.name
            checked += 1
        if node not in classes:
            continue
        cls = getattr(_bigfile, node.name)
        for item in node.body:
            if not isinstance(item, ast.FunctionDef) or item.name in _PROTOCOL:
                continue
            where = f"{node.name}.{item.name}"
            if _is_property(item):
                assert isinstance(inspect.getattr_static(cls, item.name), types.GetSetDescriptorType), where
                continue
            if item.name in ("__new__", "__init__"):
                # The constructor's signature is the class's.
                runtime = _runtime_params(cls)
            else:
                runtime = _runtime_params(getattr(cls, item.name))[1:]
            assert _stub_params(item, drop_first=True) == runtime, where
            checked += 1
    assert checked > 30


def test_runtime_properties_are_properties_in_the_stub():
    tree = ast.parse((PKG / "_bigfile.pyi").read_text())
    classes = _runtime_classes(tree)
    stub = {
        (node.name, item.name)
        for node in classes
        for item in node.body
        if isinstance(item, ast.FunctionDef) and _is_property(item)
    }
    for node in classes:
        cls = getattr(_bigfile, node.name)
        for name, attr in vars(cls).items():
            if isinstance(attr, types.GetSetDescriptorType) and not name.startswith("__"):
                assert (node.name, name) in stub, f"{node.name}.{name} is a property"


def test_ram_stats_typeddict_has_the_keys_ram_stats_returns():
    tree = ast.parse((PKG / "_bigfile.pyi").read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_RamStats"]
    keys = {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    assert keys == set(_bigfile.RAM().stats())
