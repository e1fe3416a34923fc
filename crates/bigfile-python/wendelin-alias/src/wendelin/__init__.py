"""wendelin.core's module paths, as aliases of bigfile's (the optional
bigfile-wendelin-alias distribution).

Importing ``wendelin`` (any ``wendelin.*`` below) makes each module of
``bigfile.compat.WENDELIN_MODULES`` importable under its wendelin.core
path as the bigfile module itself: ``wendelin.bigfile.file_zodb`` *is*
``bigfile.file_zodb``, so classes, functions and module attributes are
bigfile's, nothing is added or changed but names. The classes defined in
those modules are renamed to the wendelin.core paths (``__module__``), so
pickle, and so ZODB, names them as wendelin.core does: databases written
by wendelin.core load with plain ``ZODB.DB``, and what a program writes
through bigfile is readable by wendelin.core again. That renaming is the
one effect on bigfile itself, and only in processes that import
``wendelin``.

Never next to a real wendelin.core, which provides the same package: this
module refuses to be imported when the wendelin.core distribution is
installed on ``sys.path``.
"""

import importlib
import importlib.metadata
import sys


def _refuse_next_to_wendelin_core() -> None:
    try:
        dist = importlib.metadata.distribution("wendelin.core")
    except importlib.metadata.PackageNotFoundError:
        return
    raise ImportError(
        f"bigfile-wendelin-alias: wendelin.core {dist.version} is installed ({dist.locate_file('')}), "
        "and this package, bigfile's alias of it, is in its place: uninstall one of them"
    )


def _install_aliases() -> None:
    from bigfile.compat import WENDELIN_MODULES

    # parents first, so each alias is set as an attribute of its parent
    for alias, target in sorted(WENDELIN_MODULES.items()):
        module = importlib.import_module(target)
        for obj in list(vars(module).values()):
            if isinstance(obj, type) and obj.__module__ == target:
                obj.__module__ = alias
        sys.modules[alias] = module
        parent, _, child = alias.rpartition(".")
        setattr(importlib.import_module(parent), child, module)


_refuse_next_to_wendelin_core()
_install_aliases()
