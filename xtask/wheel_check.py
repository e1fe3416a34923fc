"""Checks a wheel's extension modules for symbols that glibc 2.17 (the
manylinux2014 baseline the wheels are built for) lacks and that the
modules need without naming a version: linked against zig's glibc 2.17
stubs, such a symbol stays unversioned, auditwheel does not see it, and
the module fails to load on a glibc older than the one that added it
(memfd_create 2.27, gettid 2.30, ...). Weak references are fine: the code
behind them checks at run time. Python's own API is resolved by the
interpreter. Exit status 1 and the list when any is found.

    python wheel_check.py WHEEL
"""

import io
import sys
import zipfile

from elftools.elf.elffile import ELFFile  # pyelftools, which auditwheel needs


def unversioned_strong_imports(data):
    elf = ELFFile(io.BytesIO(data))
    dynsym = elf.get_section_by_name(".dynsym")
    versym = elf.get_section_by_name(".gnu.version")
    out = []
    for i, sym in enumerate(dynsym.iter_symbols()):
        if sym["st_shndx"] != "SHN_UNDEF" or not sym.name or sym["st_info"]["bind"] != "STB_GLOBAL":
            continue
        if sym.name.startswith(("Py", "_Py")):
            continue
        ver = versym.get_symbol(i)["ndx"] if versym is not None else "VER_NDX_GLOBAL"
        if ver in ("VER_NDX_GLOBAL", "VER_NDX_LOCAL", 0, 1):
            out.append(sym.name)
    return out


def main(path):
    bad = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.endswith(".so") or ".so." in name:
                found = unversioned_strong_imports(z.read(name))
                if found:
                    bad[name] = found
    if bad:
        for name, syms in bad.items():
            print(f"{path}: {name} needs, without a glibc version: {', '.join(sorted(syms))}")
        print("it would not load on the older glibc its manylinux tag promises: call these through syscall(2)")
        return 1
    print(f"{path}: no unversioned strong imports")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
