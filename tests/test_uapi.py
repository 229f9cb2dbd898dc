"""iommufd_cuse.uapi checked against the ABI fact tables of Linux 7.3 in shared/abi/.

The tables are generated from the kernel's headers; uapi.py is written by hand. Every
struct in struct_layouts.tsv must be defined with the same sizeof and the same offset and
size for every member; every constant in constants.tsv must exist with the same value;
the ioctl table must match iommufd_ioctl_table.tsv.
"""

import csv
import random
import re
import struct
from pathlib import Path

import pytest

from iommufd_cuse import uapi
from iommufd_cuse.uapi import CStruct, offsetofend

ABI = Path(__file__).parents[1].parent / "shared" / "abi"


def _read(name: str) -> list[dict[str, str]]:
    with (ABI / name).open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _py_name(c_name: str) -> str:
    """uapi's naming rule: leading underscores and array brackets dropped."""
    return re.sub(r"\[\d*\]$", "", c_name).lstrip("_")


# struct -> sizeof; struct -> {field: (offset, size)}; iommu_test_cmd's union rows as
# member -> {field: (offset, size)}
SIZEOF: dict[str, int] = {}
LAYOUT: dict[str, dict[str, tuple[int, int]]] = {}
UNION_ROWS: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
for row in _read("struct_layouts.tsv"):
    name, field = row["struct"], row["field"]
    offset, size = int(row["offset"]), int(row["size"])
    if field == "(sizeof)":
        SIZEOF[name] = size
        LAYOUT.setdefault(name, {})
    elif "." in field:
        member, inner = field.split(".", 1)
        UNION_ROWS.setdefault(name, {}).setdefault(member, {})[_py_name(inner)] = (offset, size)
    else:
        LAYOUT.setdefault(name, {})[_py_name(field)] = (offset, size)

CONSTANTS = {row["name"]: int(row["value"], 16) for row in _read("constants.tsv")}
IOCTLS = _read("iommufd_ioctl_table.tsv")

# Fields of uapi that stand for something the tables spell differently: the raw bytes of
# iommu_test_cmd's union (its members are checked one by one below).
RAW_UNIONS = {"iommu_test_cmd": "data"}

# Structs uapi defines that the tables do not cover: the selftest mock driver's data.
UNCHECKED = {
    "iommu_test_hw_info",
    "iommu_hwpt_selftest",
    "iommu_hwpt_invalidate_selftest",
    "iommu_viommu_selftest",
    "iommu_viommu_invalidate_selftest",
    "iommu_viommu_event_selftest",
}

ALL_STRUCTS = sorted(uapi.STRUCTS)


def _layout_mismatches(
    s: CStruct, sizeof: int, expected: dict[str, tuple[int, int]], raw: str | None = None
) -> list[str]:
    """Differences between a CStruct and a table's layout, as readable lines."""
    problems = []
    if s.SIZE != sizeof:
        problems.append(f"sizeof: uapi {s.SIZE}, table {sizeof}")
    if struct.calcsize(s.FORMAT) != s.SIZE:
        problems.append(f"FORMAT {s.FORMAT!r} is {struct.calcsize(s.FORMAT)} bytes")
    actual = {k: v for k, v in s.FIELDS.items() if k != raw}
    for field in sorted(expected.keys() | actual.keys()):
        if expected.get(field) != actual.get(field):
            problems.append(f"{field}: uapi (offset, size) {actual.get(field)}, table {expected.get(field)}")
    return problems


# ---------------------------------------------------------------------------------------
# struct layouts


def test_every_table_struct_is_defined():
    missing = sorted(set(SIZEOF) - set(uapi.STRUCTS))
    assert not missing, f"structs in struct_layouts.tsv without a uapi definition: {missing}"


def test_every_defined_struct_is_checked_or_known_unchecked():
    members = {f"iommu_test_cmd.{m}" for m in uapi.IOMMU_TEST_CMD_UNION}
    extra = set(uapi.STRUCTS) - set(SIZEOF) - members
    assert extra == UNCHECKED


@pytest.mark.parametrize("name", sorted(SIZEOF))
def test_struct_layout(name):
    s = uapi.STRUCTS[name]
    assert s.NAME == name
    assert getattr(uapi, name) is s
    assert _layout_mismatches(s, SIZEOF[name], LAYOUT[name], RAW_UNIONS.get(name)) == []


def test_layout_check_can_fail():
    s = uapi.iommu_ioas_map
    good = dict(LAYOUT["iommu_ioas_map"])
    assert _layout_mismatches(s, 40, good) == []
    assert _layout_mismatches(s, 48, good)
    assert _layout_mismatches(s, 40, {**good, "iova": (24, 8)})
    assert _layout_mismatches(s, 40, {**good, "iova": (32, 4)})
    assert _layout_mismatches(s, 40, {k: v for k, v in good.items() if k != "reserved"})
    assert _layout_mismatches(s, 40, {**good, "extra": (40, 0)})


def test_iommu_test_cmd_union():
    cmd = uapi.iommu_test_cmd
    base, size = cmd.FIELDS["data"]
    assert base == uapi.IOMMU_TEST_CMD_UNION_OFFSET
    rows = UNION_ROWS["iommu_test_cmd"]
    assert set(uapi.IOMMU_TEST_CMD_UNION) == set(rows)
    for member, fields in rows.items():
        m = uapi.IOMMU_TEST_CMD_UNION[member]
        assert m.NAME == f"iommu_test_cmd.{member}"
        at_union = {f: (off + base, sz) for f, (off, sz) in m.FIELDS.items()}
        assert at_union == fields, member
        assert m.SIZE <= size
    # the raw union spans exactly from the first member byte to `last`
    union_size = max(m.SIZE for m in uapi.IOMMU_TEST_CMD_UNION.values())
    union_align = max(m.ALIGN for m in uapi.IOMMU_TEST_CMD_UNION.values())
    assert size == -(-union_size // union_align) * union_align
    assert base + size == cmd.FIELDS["last"][0]


def test_iommu_test_op_structs_cover_every_op():
    ops = {v for k, v in CONSTANTS.items() if k.startswith("IOMMU_TEST_OP_")}
    assert set(uapi.IOMMU_TEST_OP_STRUCTS) == ops
    assert set(uapi.IOMMU_TEST_OP_STRUCTS.values()) <= set(uapi.IOMMU_TEST_CMD_UNION.values())
    dirty = uapi.IOMMU_TEST_OP_STRUCTS[uapi.IOMMU_TEST_OP_DIRTY]
    assert dirty is uapi.IOMMU_TEST_CMD_UNION["dirty"]


# ---------------------------------------------------------------------------------------
# constants and the ioctl table


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constant(name):
    value = getattr(uapi, name, None)
    assert value is not None, f"uapi.{name} is missing"
    assert type(value) is int
    assert value == CONSTANTS[name], f"uapi.{name} = {value:#x}, table {CONSTANTS[name]:#x}"


def test_io():
    assert uapi._IO(ord(";"), 0x80) == 0x3B80
    assert uapi._IO(uapi.VFIO_TYPE, uapi.VFIO_BASE + 18) == uapi.VFIO_DEVICE_BIND_IOMMUFD


@pytest.mark.parametrize("row", IOCTLS, ids=[r["ioctl"] for r in IOCTLS])
def test_ioctl_table_row(row):
    number = int(row["number"], 16)
    assert getattr(uapi, row["ioctl"]) == number
    s, min_size = uapi.IOCTL_STRUCTS[number]
    assert s is uapi.STRUCTS[row["struct"]]
    assert s.SIZE == int(row["sizeof"])
    assert min_size == int(row["min_size"])
    assert offsetofend(s, _py_name(row["last_member"])) == min_size
    assert s.FIELDS["size"] == (0, 4)  # the length word every iommufd struct starts with


def test_ioctl_table_complete():
    assert set(uapi.IOCTL_STRUCTS) == {int(r["number"], 16) for r in IOCTLS}


# ---------------------------------------------------------------------------------------
# pack / unpack


def _covered(s: CStruct) -> set[int]:
    """Byte offsets that belong to some field (the rest is padding)."""
    return {i for off, size in s.FIELDS.values() for i in range(off, off + size)}


@pytest.mark.parametrize("name", ALL_STRUCTS)
def test_zero_record(name):
    s = uapi.STRUCTS[name]
    zero = s.new()
    assert s.pack(zero) == bytes(s.SIZE)
    assert s.unpack(bytes(s.SIZE)) == zero
    assert repr(zero).startswith(s.record.__name__ + "(")


@pytest.mark.parametrize("name", ALL_STRUCTS)
def test_round_trip(name):
    s = uapi.STRUCTS[name]
    rng = random.Random(name)
    data = rng.randbytes(s.SIZE)
    covered = _covered(s)
    # padding is written as zero; every other byte survives unpack + pack
    expected = bytes(b if i in covered else 0 for i, b in enumerate(data))
    obj = s.unpack(data)
    assert s.pack(obj) == expected
    assert s.unpack(expected) == obj
    # at an offset inside a longer buffer, and pack_into
    buf = bytearray(rng.randbytes(7)) + bytearray(data) + bytearray(rng.randbytes(5))
    assert s.unpack(buf, 7) == obj
    out = bytearray(b"\xaa" * (s.SIZE + 9))
    s.pack_into(out, 4, obj)
    assert out == b"\xaa" * 4 + expected + b"\xaa" * 5


@pytest.mark.parametrize("name", ALL_STRUCTS)
def test_each_field_lands_at_its_offset(name):
    s = uapi.STRUCTS[name]
    ones = s.unpack(b"\xff" * s.SIZE)  # every field all-ones, in its own Python type
    for field, (off, size) in s.FIELDS.items():
        if size == 0:  # flexible array: no value, starts at the end
            assert off == s.SIZE
            continue
        obj = s.new()
        setattr(obj, field, getattr(ones, field))
        packed = s.pack(obj)
        assert packed == bytes(off) + b"\xff" * size + bytes(s.SIZE - off - size), field


def test_record_is_mutable_with_kwargs_and_defaults():
    m = uapi.iommu_ioas_map.new(size=40, flags=uapi.IOMMU_IOAS_MAP_FIXED_IOVA, iova=0x1000)
    assert (m.size, m.flags, m.ioas_id, m.reserved, m.user_va, m.iova) == (40, 1, 0, 0, 0, 0x1000)
    m.length = 0x2000
    raw = uapi.iommu_ioas_map.pack(m)
    assert raw == struct.pack("<IIIIQQQ", 40, 1, 0, 0, 0, 0x2000, 0x1000)
    assert uapi.iommu_ioas_map.unpack(raw) == m
    with pytest.raises(AttributeError):
        m.no_such_field = 1
    with pytest.raises(TypeError):
        uapi.iommu_ioas_map.new(no_such_field=1)


def test_pack_rejects_out_of_range_values():
    with pytest.raises(struct.error):
        uapi.iommu_destroy.pack(uapi.iommu_destroy.new(id=1 << 32))
    with pytest.raises(struct.error):
        uapi.iommu_option.pack(uapi.iommu_option.new(op=-1))
    with pytest.raises(struct.error):
        uapi.iommu_hwpt_arm_smmuv3.pack(uapi.iommu_hwpt_arm_smmuv3.new(ste=(1, 2, 3)))


def test_short_buffer_is_an_error():
    with pytest.raises(struct.error):
        uapi.iommu_ioas_map.unpack(bytes(39))


def test_union_aliases_share_storage():
    info = uapi.iommu_hw_info.new(out_data_type=uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD)
    assert info.in_data_type == info.out_data_type == 1
    info.in_data_type = 7
    assert info.out_data_type == 7
    assert uapi.iommu_hw_info.FIELDS["in_data_type"] == uapi.iommu_hw_info.FIELDS["out_data_type"]
    dep = uapi.vfio_pci_dependent_device.new(devid=5, bus=1)
    assert uapi.vfio_pci_dependent_device.pack(dep) == struct.pack("<IHBB", 5, 0, 1, 0)
    with pytest.raises(TypeError):
        uapi.iommu_hw_info.new(in_data_type=1, out_data_type=2)


def test_arrays_bytes_and_nested():
    smmu = uapi.iommu_hw_info_arm_smmuv3.new(idr=tuple(range(6)))
    assert uapi.iommu_hw_info_arm_smmuv3.unpack(uapi.iommu_hw_info_arm_smmuv3.pack(smmu)) == smmu
    info = uapi.iommu_hw_info.unpack(bytes(29) + b"abc" + bytes(8))
    assert info.reserved == b"abc"
    cap = uapi.vfio_region_info_cap_type.new(type=1, subtype=2)
    cap.header.id = uapi.VFIO_REGION_INFO_CAP_TYPE
    cap.header.version = 1
    raw = uapi.vfio_region_info_cap_type.pack(cap)
    assert raw == struct.pack("<HHIII", 2, 1, 0, 1, 2)
    again = uapi.vfio_region_info_cap_type.unpack(raw)
    assert again.header == uapi.vfio_info_cap_header.new(id=2, version=1)
    # nested defaults are fresh per record
    assert uapi.vfio_region_info_cap_type.new().header is not uapi.vfio_region_info_cap_type.new().header


def test_flexible_array_members():
    s = uapi.vfio_pci_hot_reset_info
    assert s.FLEX == ("devices", uapi.vfio_pci_dependent_device)
    assert uapi.offsetof(s, "devices") == s.SIZE == 12
    assert uapi.vfio_irq_set.FLEX == ("data", "B")
    assert uapi.iommu_ioas_map.FLEX is None


def test_test_cmd_member_at_union_offset():
    cmd = uapi.iommu_test_cmd.new(size=72, op=uapi.IOMMU_TEST_OP_DIRTY, id=3)
    buf = bytearray(uapi.iommu_test_cmd.pack(cmd))
    member = uapi.IOMMU_TEST_OP_STRUCTS[cmd.op]
    member.pack_into(buf, uapi.IOMMU_TEST_CMD_UNION_OFFSET, member.new(flags=1, out_nr_dirty=9))
    back = uapi.iommu_test_cmd.unpack(buf)
    assert (back.size, back.op, back.id, back.last) == (72, uapi.IOMMU_TEST_OP_DIRTY, 3, 0)
    dirty = member.unpack(buf, uapi.IOMMU_TEST_CMD_UNION_OFFSET)
    assert (dirty.flags, dirty.out_nr_dirty) == (1, 9)
    assert struct.unpack_from("<Q", buf, 56) == (9,)


@pytest.mark.parametrize(
    "spec",
    [
        "a:I b:Q",  # b needs 4 bytes of padding before it
        "a:Q b:I",  # sizeof needs 4 bytes of tail padding
        "a:I a:I",  # duplicate name
        "a:I b:B[] c:I",  # flexible array not last
        "__reserved:I",  # names are written without leading underscores
        "a:no_such_struct",
    ],
)
def test_bad_declarations_are_refused(spec):
    with pytest.raises((ValueError, KeyError)):
        CStruct("test_uapi_bad_declaration", spec)
    assert "test_uapi_bad_declaration" not in uapi.STRUCTS
