"""cffi build of the native core (API mode): `pip install .` runs it through setup.py."""

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))


def _cdef(header: str) -> str:
    """The header as cffi's cdef: integer macros become `...`, other directives go."""
    out = []
    for line in header.splitlines():
        m = re.match(r"#define\s+(ICUSE_\w+)\s+\S", line)
        if m:
            out.append(f"#define {m.group(1)} ...")
        elif not line.startswith("#"):
            out.append(line)
    return "\n".join(out)


ffibuilder = FFI()
ffibuilder.cdef(_cdef((HERE / "icuse.h").read_text()))
ffibuilder.set_source(
    "iommufd_cuse._native",
    '#include "icuse.h"',
    sources=SOURCES,
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    # Developer shortcut: build the extension in place next to the package.
    import os

    os.chdir(HERE.parent)
    ffibuilder.compile(verbose=False)
