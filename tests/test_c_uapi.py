"""include/iommufd-cuse/uapi.h checked against the ABI fact tables in shared/abi/.

A C program is generated from the tables: for every struct it prints sizeof, and for
every member offsetof, sizeof of the member and whether the member's type is the table's
type; for every constant it prints the value. It is compiled against the header, run,
and its output compared with the tables. Any difference (or a compile error: a missing
struct, member or constant) is a failure.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABI = ROOT.parent / "shared" / "abi"
INCLUDE = ROOT / "include"
HEADER = INCLUDE / "iommufd-cuse" / "uapi.h"


def _rows(name: str) -> list[dict[str, str]]:
    with (ABI / name).open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@dataclass(frozen=True)
class Member:
    struct: str
    field: str  # as the table writes it: "size", "idr[6]", "areas[]", "add_reserved.start"
    offset: int
    size: int
    type: str

    @property
    def expr(self) -> str:
        """The member designator: array brackets dropped."""
        return re.sub(r"\[\d*\]$", "", self.field)

    @property
    def is_array(self) -> bool:
        return self.field.endswith("]")

    @property
    def is_flexible(self) -> bool:
        return self.field.endswith("[]")


SIZEOF: dict[str, int] = {}
MEMBERS: list[Member] = []
for _r in _rows("struct_layouts.tsv"):
    if _r["field"] == "(sizeof)":
        SIZEOF[_r["struct"]] = int(_r["size"])
    else:
        MEMBERS.append(Member(_r["struct"], _r["field"], int(_r["offset"]), int(_r["size"]), _r["type"]))
CONSTANTS = {r["name"]: int(r["value"], 16) for r in _rows("constants.tsv")}


def generate_program() -> str:
    out = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <iommufd-cuse/uapi.h>",
        "",
        "int main(void)",
        "{",
    ]
    for s in SIZEOF:
        out.append(f'\tprintf("S\\t{s}\\t%zu\\n", sizeof(struct {s}));')
    for m in MEMBERS:
        obj = f"((struct {m.struct} *)0)->{m.expr}"
        elem = f"{obj}[0]" if m.is_array else obj
        # sizeof a flexible array member does not exist: the table says 0 for it.
        msize = "(size_t)0" if m.is_flexible else f"sizeof({obj})"
        out.append(
            f'\tprintf("F\\t{m.struct}\\t{m.field}\\t%zu\\t%zu\\t%d\\n", '
            f"offsetof(struct {m.struct}, {m.expr}), {msize}, "
            f"__builtin_types_compatible_p(__typeof__({elem}), {m.type}));"
        )
    for name in CONSTANTS:
        out.append(f'\tprintf("C\\t{name}\\t0x%llx\\n", (unsigned long long)({name}));')
    out += ["\treturn 0;", "}", ""]
    return "\n".join(out)


def check_header(include_dir: Path, workdir: Path) -> list[str]:
    """Compile the generated program against include_dir and list every difference."""
    src = workdir / "uapi_layout.c"
    exe = workdir / "uapi_layout"
    src.write_text(generate_program())
    cc = subprocess.run(
        ["cc", "-std=gnu11", "-Wall", "-Werror", f"-I{include_dir}", "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
    )
    if cc.returncode != 0:
        errors = [line for line in cc.stderr.splitlines() if "error" in line]
        return ["compile: " + line for line in errors[:40]] or ["compile failed: " + cc.stderr]
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)

    problems: list[str] = []
    seen_sizes: dict[str, int] = {}
    seen_members: dict[tuple[str, str], tuple[int, int, bool]] = {}
    seen_consts: dict[str, int] = {}
    for line in run.stdout.splitlines():
        kind, *rest = line.split("\t")
        if kind == "S":
            seen_sizes[rest[0]] = int(rest[1])
        elif kind == "F":
            seen_members[(rest[0], rest[1])] = (int(rest[2]), int(rest[3]), rest[4] == "1")
        elif kind == "C":
            seen_consts[rest[0]] = int(rest[1], 16)
    for s, size in SIZEOF.items():
        if seen_sizes.get(s) != size:
            problems.append(f"sizeof(struct {s}) = {seen_sizes.get(s)}, table {size}")
    for m in MEMBERS:
        got = seen_members.get((m.struct, m.field))
        if got is None:
            problems.append(f"{m.struct}.{m.field}: not printed")
            continue
        off, size, type_ok = got
        if (off, size) != (m.offset, m.size):
            problems.append(f"{m.struct}.{m.field}: offset {off} size {size}, table offset {m.offset} size {m.size}")
        if not type_ok:
            problems.append(f"{m.struct}.{m.field}: type is not {m.type}")
    for name, value in CONSTANTS.items():
        if seen_consts.get(name) != value:
            got = seen_consts.get(name)
            problems.append(f"{name} = {got if got is None else hex(got)}, table {value:#x}")
    return problems


def test_header_matches_abi_tables(tmp_path: Path) -> None:
    problems = check_header(INCLUDE, tmp_path)
    assert problems == [], "uapi.h differs from shared/abi/:\n" + "\n".join(problems)


def test_tables_are_covered() -> None:
    # every struct of the tables is printed, every member row belongs to a struct with a sizeof
    assert len(SIZEOF) > 80 and len(MEMBERS) > 400 and len(CONSTANTS) > 300
    assert {m.struct for m in MEMBERS} <= set(SIZEOF)


def _mutated(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of include/ whose uapi.h has `old` replaced by `new` (exactly once)."""
    inc = tmp_path / "include"
    shutil.copytree(INCLUDE, inc)
    h = inc / "iommufd-cuse" / "uapi.h"
    text = h.read_text()
    assert text.count(old) == 1, old
    h.write_text(text.replace(old, new))
    return inc


@pytest.mark.parametrize(
    "old, new, expect",
    [
        # a member's size (and with it the next offsets and the sizeof)
        (
            "\t__u32 flags;\n\t__u32 out_ioas_id;",
            "\t__u64 flags;\n\t__u32 out_ioas_id;",
            "iommu_ioas_alloc.flags: offset 8 size 8",
        ),
        # a member's type only (same size, other signedness)
        (
            "\t__s32 fd;\n\t__aligned_u64 start;",
            "\t__u32 fd;\n\t__aligned_u64 start;",
            "iommu_ioas_map_file.fd: type is not __s32",
        ),
        # two members swapped: same sizes, other offsets
        (
            "\t__u32 dst_ioas_id;\n\t__u32 src_ioas_id;",
            "\t__u32 src_ioas_id;\n\t__u32 dst_ioas_id;",
            "iommu_ioas_copy.dst_ioas_id: offset 12",
        ),
        # a constant's value
        ("#define VFIO_EEH 5", "#define VFIO_EEH 6", "VFIO_EEH = 0x6, table 0x5"),
        ("IOMMUFD_CMD_OPTION = 0x87", "IOMMUFD_CMD_OPTION = 0x88", "IOMMU_OPTION = 0x3b88"),
        # padding at the end (sizeof only)
        ("\t__u32 last;\n};", "\t__u32 last;\n\t__u32 extra[3];\n};", "sizeof(struct iommu_test_cmd) = 80"),
        # a missing constant: the program does not compile
        ("#define VFIO_UPDATE_VADDR 10\n", "", "compile:"),
    ],
)
def test_check_can_fail(tmp_path: Path, old: str, new: str, expect: str) -> None:
    problems = check_header(_mutated(tmp_path, old, new), tmp_path)
    assert any(expect in p for p in problems), problems


STRICT = ["-Wall", "-Wextra", "-Werror", "-fsyntax-only"]


@pytest.mark.parametrize(
    "compiler, flags",
    [
        ("cc", ["-std=c11", "-Wpedantic"]),
        ("cc", ["-std=gnu99"]),
        ("g++", ["-std=gnu++17", "-x", "c++"]),
    ],
    ids=["c11-pedantic", "gnu99", "c++"],
)
def test_header_compiles_standalone(tmp_path: Path, compiler: str, flags: list[str]) -> None:
    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler}")
    src = tmp_path / "t.c"
    src.write_text("#include <iommufd-cuse/uapi.h>\nint x = IOMMU_IOAS_ALLOC + VFIO_DEVICE_BIND_IOMMUFD;\n")
    subprocess.run([compiler, *flags, *STRICT, f"-I{INCLUDE}", str(src)], check=True)


def test_kernel_headers_after_ours_are_ignored(tmp_path: Path) -> None:
    """<linux/vfio.h> (old, on Debian 12) included after ours adds nothing and clashes with nothing."""
    if not Path("/usr/include/linux/vfio.h").exists():
        pytest.skip("no <linux/vfio.h>")
    src = tmp_path / "t.c"
    src.write_text(
        "#include <iommufd-cuse/uapi.h>\n#include <linux/vfio.h>\n"
        "struct vfio_device_bind_iommufd b = { .argsz = sizeof(b) };\n"
    )
    subprocess.run(["cc", *STRICT, f"-I{INCLUDE}", str(src)], check=True)


def test_kernel_headers_before_ours_are_an_error(tmp_path: Path) -> None:
    if not Path("/usr/include/linux/vfio.h").exists():
        pytest.skip("no <linux/vfio.h>")
    src = tmp_path / "t.c"
    src.write_text("#include <linux/vfio.h>\n#include <iommufd-cuse/uapi.h>\n")
    p = subprocess.run(["cc", *STRICT, f"-I{INCLUDE}", str(src)], capture_output=True, text=True)
    assert p.returncode != 0
    assert "include only this one" in p.stderr
