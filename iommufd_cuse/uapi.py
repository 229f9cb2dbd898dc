"""The binary interface served by the daemon: Linux 7.3 iommufd and VFIO uAPI, plus the
iommufd selftest command header (``drivers/iommu/iommufd/iommufd_test.h``).

One module, imported by everything else. Layouts are x86_64 little-endian; every struct is
checked field by field against ``shared/abi/`` by ``tests/test_uapi.py``.

Structs
    Each C struct is a module-level :class:`CStruct` named exactly as in C
    (``uapi.iommu_ioas_map``); ioctl numbers and flags keep their C names too
    (``uapi.IOMMU_IOAS_MAP``)::

        m = iommu_ioas_map.unpack(buf)          # mutable record, attribute access
        m.iova = 0x10000
        out = iommu_ioas_map.pack(m)            # bytes of iommu_ioas_map.SIZE
        r = iommu_iova_range.new(start=0, last=0xFFFF)   # unnamed fields are 0

Field spec
    A struct is declared with a whitespace-separated spec, one token per C member in
    order, written the way ``struct`` spells it (always ``<``, no implicit padding):

    ``name:I``            scalar (``B H I Q`` unsigned, ``b h i q`` signed)
    ``name:6I``           fixed array of scalars, a tuple of 6 ints
    ``name:16s``          ``__u8 name[16]`` as one bytes value
    ``name:other_struct`` nested struct (a record of that struct), by C name
    ``a|b:I``             a union of same-typed members: ``a`` holds the value, ``b`` is an
                          alias for it (attribute, kwarg and ``FIELDS`` entry)
    ``name:ELEM[]``       flexible array member (last; no value; offset is ``SIZE``)
    ``4x``                padding the C compiler inserts; must be written out

    Alignment is verified when a struct is declared: a missing pad raises ValueError.

Naming rule
    Field names are the C names with leading underscores dropped and array brackets
    removed: ``__reserved`` -> ``reserved``, ``__reserved[3]`` -> ``reserved``,
    ``__resv1`` -> ``resv1``, ``ste[2]`` -> ``ste``.

Unions that are not same-typed (``iommu_test_cmd``) keep the union as raw bytes
(``data``) and each member is its own CStruct, used at the union's offset::

    cmd = iommu_test_cmd.unpack(buf)
    arg = IOMMU_TEST_OP_STRUCTS[cmd.op].unpack(buf, IOMMU_TEST_CMD_UNION_OFFSET)

Two constants are C ``int`` expressions that are negative and are given here the way the
ABI tables show them, sign-extended to 64 bits: ``VFIO_REGION_TYPE_PCI_VENDOR_TYPE`` and
``VFIO_PCI_DEVID_NOT_OWNED``. Mask them with ``0xFFFFFFFF`` before storing into a
``__u32`` field.
"""

from __future__ import annotations

import keyword
import re
import struct
from operator import attrgetter
from typing import Any

_Buffer = bytes | bytearray | memoryview


def _IO(type: int, nr: int) -> int:
    """``_IO(type, nr)``: an ioctl number with no direction and no size encoded."""
    return (type << 8) | nr


# ---------------------------------------------------------------------------------------
# The struct helper


class _Record:
    """Base of the per-struct record classes (mutable, ``__slots__``, compared by value)."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __repr__(self) -> str:
        parts = []
        for name in self._fields:
            value = getattr(self, name)
            parts.append(f"{name}={value:#x}" if type(value) is int else f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    __hash__ = None  # type: ignore[assignment]  # mutable


def _record_class(name: str, fields: list[tuple[str, Any]]) -> type[_Record]:
    """A ``__slots__`` class whose ``__init__(self, f1=0, f2=0, ...)`` takes the fields in
    C order, positionally or by name. The ``__init__`` is compiled from the field names,
    the same technique ``collections.namedtuple`` and ``dataclasses`` use: it is what
    makes ``unpack`` one C-speed call instead of a loop of ``setattr``."""
    ns: dict[str, Any] = {}
    params, body = [], []
    for i, (fname, default) in enumerate(fields):
        if isinstance(default, CStruct):  # nested: a fresh record per instance
            ns[f"_n{i}"] = default.new
            params.append(f"{fname}=None")
            body.append(f"    self.{fname} = _n{i}() if {fname} is None else {fname}")
        else:  # int, bytes or tuple: immutable, safe to share
            ns[f"_d{i}"] = default
            params.append(f"{fname}=_d{i}")
            body.append(f"    self.{fname} = {fname}")
    exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body), ns)
    names = tuple(f for f, _ in fields)
    attrs = {"__slots__": names, "_fields": names, "__init__": ns["__init__"]}
    attrs["__module__"] = __name__
    return type(name, (_Record,), attrs)


_SCALAR = re.compile(r"(\d*)([bBhHiIqQ])")
_BYTES = re.compile(r"(\d+)s")
_PAD = re.compile(r"(\d+)x")

# kinds of value a field holds in a record
_ONE, _ARRAY, _NESTED = 0, 1, 2

#: Every CStruct ever declared, by C name (``iommu_test_cmd`` union members as
#: ``iommu_test_cmd.<member>``).
STRUCTS: dict[str, CStruct] = {}


class CStruct:
    """One C struct: its layout, and ``unpack``/``pack`` between bytes and a record.

    ``NAME`` C name; ``SIZE`` sizeof; ``ALIGN`` alignof; ``FORMAT`` the ``struct`` format;
    ``FIELDS`` name -> (offset, size), aliases and a flexible array (size 0) included;
    ``FLEX`` (name, element CStruct or format char) of the flexible array, or None;
    ``record`` the record class (instances come from ``unpack`` and ``new``).
    """

    __slots__ = (
        "NAME",
        "SIZE",
        "ALIGN",
        "FORMAT",
        "FIELDS",
        "FLEX",
        "record",
        "_st",
        "_flat",
        "_plan",
        "_get",
        "_aliases",
        "_nvalues",
    )

    def __init__(self, name: str, spec: str) -> None:
        if name in STRUCTS:
            raise ValueError(f"struct {name} declared twice")
        fmt = ["<"]
        fields: dict[str, tuple[int, int]] = {}
        record_fields: list[tuple[str, Any]] = []
        plan: list[tuple[int, int, CStruct | None]] = []
        aliases: dict[str, str] = {}
        align = 1
        pos = 0
        flex: tuple[str, CStruct | str] | None = None
        for token in spec.split():
            if flex is not None:
                raise ValueError(f"{name}: flexible array {flex[0]} must be last")
            if _PAD.fullmatch(token):
                fmt.append(token)
                pos += int(token[:-1])
                continue
            names_part, sep, code = token.partition(":")
            if not sep:
                raise ValueError(f"{name}: bad field token {token!r}")
            names = names_part.split("|")
            for n in names:
                if not n.isidentifier() or keyword.iskeyword(n) or n.startswith("_"):
                    raise ValueError(f"{name}: bad field name {n!r}")
                if n in fields:
                    raise ValueError(f"{name}: field {n} declared twice")
            if code.endswith("[]"):
                elem_code = code[:-2]
                elem: CStruct | str = elem_code if _SCALAR.fullmatch(elem_code) else STRUCTS[elem_code]
                flex = (names[0], elem)
                fields[names[0]] = (-1, 0)  # offset is SIZE, filled in below
                continue
            if m := _SCALAR.fullmatch(code):
                count = int(m.group(1) or 1)
                item = struct.calcsize(m.group(2))
                size, falign = item * count, item
                kind, nvalues = (_ONE, 1) if count == 1 else (_ARRAY, count)
                default: Any = 0 if count == 1 else (0,) * count
                sub = None
            elif _BYTES.fullmatch(code):
                size, falign, kind, nvalues = int(code[:-1]), 1, _ONE, 1
                default = bytes(size)
                sub = None
            else:
                sub = STRUCTS[code]
                size, falign, kind, nvalues = sub.SIZE, sub.ALIGN, _NESTED, sub._nvalues
                default = sub
                code = sub.FORMAT[1:]
            if pos % falign:
                raise ValueError(f"{name}.{names[0]} at {pos} is not {falign}-aligned")
            align = max(align, falign)
            fmt.append(code)
            for n in names:
                fields[n] = (pos, size)
            for n in names[1:]:
                aliases[n] = names[0]
            record_fields.append((names[0], default))
            plan.append((kind, nvalues, sub))
            pos += size
        if flex is not None:
            elem_align = flex[1].ALIGN if isinstance(flex[1], CStruct) else struct.calcsize(flex[1])
            align = max(align, elem_align)
            fields[flex[0]] = (pos, 0)
        if pos % align:
            raise ValueError(f"{name}: size {pos} lacks tail padding to {align}")

        self.NAME = name
        self.SIZE = pos
        self.ALIGN = align
        self.FORMAT = "".join(fmt)
        self.FIELDS = fields
        self.FLEX = flex
        self._st = struct.Struct(self.FORMAT)
        assert self._st.size == pos
        self._plan = plan
        self._flat = all(kind == _ONE for kind, _, _ in plan)
        self._nvalues = sum(n for _, n, _ in plan)
        self._aliases = aliases
        self.record = _record_class(name.replace(".", "_"), record_fields)
        for alias, target in aliases.items():
            setattr(self.record, alias, _alias_property(target))
        names_in_order = [f for f, _ in record_fields]
        if len(names_in_order) == 1:
            only = names_in_order[0]
            self._get = lambda obj: (getattr(obj, only),)
        else:
            self._get = attrgetter(*names_in_order)
        STRUCTS[name] = self

    def __repr__(self) -> str:
        return f"<CStruct {self.NAME} size={self.SIZE}>"

    def new(self, **kwargs: Any) -> Any:
        """A record with the given fields set (by C name or alias) and the rest zero."""
        if self._aliases:
            renamed = {self._aliases.get(k, k): v for k, v in kwargs.items()}
            if len(renamed) != len(kwargs):
                raise TypeError(f"{self.NAME}: a union member given twice")
            kwargs = renamed
        return self.record(**kwargs)

    def unpack(self, buf: _Buffer, offset: int = 0) -> Any:
        """The record of the ``SIZE`` bytes at ``offset`` in ``buf`` (which may be longer)."""
        values = self._st.unpack_from(buf, offset)
        if self._flat:
            return self.record(*values)
        return self._from_values(values)

    def pack(self, obj: Any) -> bytes:
        """``obj``'s bytes, ``SIZE`` long, padding zero. struct.error if a value is out of range."""
        if self._flat:
            return self._st.pack(*self._get(obj))
        return self._st.pack(*self._to_values(obj))

    def pack_into(self, buf: bytearray | memoryview, offset: int, obj: Any) -> None:
        """Write ``obj`` over the ``SIZE`` bytes at ``offset`` in ``buf``."""
        if self._flat:
            self._st.pack_into(buf, offset, *self._get(obj))
        else:
            self._st.pack_into(buf, offset, *self._to_values(obj))

    def _from_values(self, values: tuple[Any, ...]) -> Any:
        out: list[Any] = []
        i = 0
        for kind, n, sub in self._plan:
            if kind == _ONE:
                out.append(values[i])
            elif kind == _ARRAY:
                out.append(values[i : i + n])
            else:
                out.append(sub._from_values(values[i : i + n]))  # type: ignore[union-attr]
            i += n
        return self.record(*out)

    def _to_values(self, obj: Any) -> list[Any]:
        out: list[Any] = []
        for (kind, n, sub), value in zip(self._plan, self._get(obj), strict=True):
            if kind == _ONE:
                out.append(value)
            elif kind == _ARRAY:
                if len(value) != n:
                    raise struct.error(f"{self.NAME}: array of {n} given {len(value)} values")
                out.extend(value)
            else:
                out.extend(sub._to_values(value))  # type: ignore[union-attr]
        return out


def _alias_property(target: str) -> property:
    def fset(obj: Any, value: Any) -> None:
        setattr(obj, target, value)

    return property(attrgetter(target), fset)


def offsetof(s: CStruct, field: str) -> int:
    """Offset of ``field`` in ``s``."""
    return s.FIELDS[field][0]


def offsetofend(s: CStruct, field: str) -> int:
    """Offset of the first byte after ``field`` in ``s``."""
    offset, size = s.FIELDS[field]
    return offset + size


# ---------------------------------------------------------------------------------------
# include/uapi/linux/iommufd.h: constants

IOMMUFD_TYPE = ord(";")

IOMMUFD_CMD_BASE = 0x80
IOMMUFD_CMD_DESTROY = 0x80
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_GET_HW_INFO = 0x8A
IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8B
IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8C
IOMMUFD_CMD_HWPT_INVALIDATE = 0x8D
IOMMUFD_CMD_FAULT_QUEUE_ALLOC = 0x8E
IOMMUFD_CMD_IOAS_MAP_FILE = 0x8F
IOMMUFD_CMD_VIOMMU_ALLOC = 0x90
IOMMUFD_CMD_VDEVICE_ALLOC = 0x91
IOMMUFD_CMD_IOAS_CHANGE_PROCESS = 0x92
IOMMUFD_CMD_VEVENTQ_ALLOC = 0x93
IOMMUFD_CMD_HW_QUEUE_ALLOC = 0x94
IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA = 0x95

IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)
IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)
IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)
IOMMU_IOAS_ALLOW_IOVAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOW_IOVAS)
IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)
IOMMU_IOAS_NOIOMMU_GET_PA = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA)
IOMMU_IOAS_MAP_FILE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP_FILE)
IOMMU_IOAS_COPY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_COPY)
IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)
IOMMU_OPTION = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_OPTION)
IOMMU_VFIO_IOAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VFIO_IOAS)
IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)
IOMMU_GET_HW_INFO = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)
IOMMU_HWPT_SET_DIRTY_TRACKING = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)
IOMMU_HWPT_GET_DIRTY_BITMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)
IOMMU_HWPT_INVALIDATE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_INVALIDATE)
IOMMU_FAULT_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_FAULT_QUEUE_ALLOC)
IOMMU_VIOMMU_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VIOMMU_ALLOC)
IOMMU_VDEVICE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VDEVICE_ALLOC)
IOMMU_IOAS_CHANGE_PROCESS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_CHANGE_PROCESS)
IOMMU_VEVENTQ_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VEVENTQ_ALLOC)
IOMMU_HW_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HW_QUEUE_ALLOC)

# iommu_ioas_map.flags (also iommu_ioas_map_file, iommu_ioas_copy)
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

# iommu_option.option_id, iommu_option.op
IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_HUGE_PAGES = 1
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1

# iommu_vfio_ioas.op
IOMMU_VFIO_IOAS_GET = 0
IOMMU_VFIO_IOAS_SET = 1
IOMMU_VFIO_IOAS_CLEAR = 2

# iommu_hwpt_alloc.flags
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_HWPT_ALLOC_PASID = 1 << 3

# iommu_hwpt_vtd_s1.flags
IOMMU_VTD_S1_SRE = 1 << 0
IOMMU_VTD_S1_EAFE = 1 << 1
IOMMU_VTD_S1_WPE = 1 << 2

# iommu_hwpt_alloc.data_type
IOMMU_HWPT_DATA_NONE = 0
IOMMU_HWPT_DATA_VTD_S1 = 1
IOMMU_HWPT_DATA_ARM_SMMUV3 = 2
IOMMU_HWPT_DATA_AMD_GUEST = 3

# iommu_hw_info_vtd.flags, iommu_hw_info_arm_smmuv3.flags
IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = 1 << 0
IOMMU_HW_INFO_ARM_SMMUV3_ERRATA_REPEAT_TLBI_CFGI = 1 << 0

# iommu_hw_info.in_data_type / out_data_type
IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_DEFAULT = 0
IOMMU_HW_INFO_TYPE_INTEL_VTD = 1
IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2
IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV = 3
IOMMU_HW_INFO_TYPE_AMD = 4

# iommu_hw_info.out_capabilities, iommu_hw_info.flags
IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0
IOMMU_HW_CAP_PCI_PASID_EXEC = 1 << 1
IOMMU_HW_CAP_PCI_PASID_PRIV = 1 << 2
IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED = 1 << 3
IOMMU_HW_INFO_FLAG_INPUT_TYPE = 1 << 0

# dirty tracking
IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1 << 0
IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1 << 0

# iommu_hwpt_invalidate.data_type, iommu_hwpt_vtd_s1_invalidate.flags
IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0
IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 = 1
IOMMU_VTD_INV_FLAGS_LEAF = 1 << 0

# iommu_hwpt_pgfault, iommu_hwpt_page_response
IOMMU_PGFAULT_FLAGS_PASID_VALID = 1 << 0
IOMMU_PGFAULT_FLAGS_LAST_PAGE = 1 << 1
IOMMU_PGFAULT_PERM_READ = 1 << 0
IOMMU_PGFAULT_PERM_WRITE = 1 << 1
IOMMU_PGFAULT_PERM_EXEC = 1 << 2
IOMMU_PGFAULT_PERM_PRIV = 1 << 3
IOMMUFD_PAGE_RESP_SUCCESS = 0
IOMMUFD_PAGE_RESP_INVALID = 1

# iommu_viommu_alloc.type
IOMMU_VIOMMU_TYPE_DEFAULT = 0
IOMMU_VIOMMU_TYPE_ARM_SMMUV3 = 1
IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV = 2

# iommufd_vevent_header.flags, iommu_veventq_alloc.type
IOMMU_VEVENTQ_FLAG_LOST_EVENTS = 1 << 0
IOMMU_VEVENTQ_TYPE_DEFAULT = 0
IOMMU_VEVENTQ_TYPE_ARM_SMMUV3 = 1
IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV = 2

# iommu_hw_queue_alloc.type
IOMMU_HW_QUEUE_TYPE_DEFAULT = 0
IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV = 1

# ---------------------------------------------------------------------------------------
# include/uapi/linux/iommufd.h: structs

iommu_destroy = CStruct("iommu_destroy", "size:I id:I")
iommu_ioas_alloc = CStruct("iommu_ioas_alloc", "size:I flags:I out_ioas_id:I")
iommu_iova_range = CStruct("iommu_iova_range", "start:Q last:Q")
iommu_ioas_iova_ranges = CStruct(
    "iommu_ioas_iova_ranges",
    "size:I ioas_id:I num_iovas:I reserved:I allowed_iovas:Q out_iova_alignment:Q",
)
iommu_ioas_allow_iovas = CStruct("iommu_ioas_allow_iovas", "size:I ioas_id:I num_iovas:I reserved:I allowed_iovas:Q")
iommu_ioas_map = CStruct("iommu_ioas_map", "size:I flags:I ioas_id:I reserved:I user_va:Q length:Q iova:Q")
iommu_ioas_noiommu_get_pa = CStruct(
    "iommu_ioas_noiommu_get_pa", "size:I flags:I ioas_id:I reserved:I iova:Q length:Q out_phys:Q"
)
iommu_ioas_map_file = CStruct("iommu_ioas_map_file", "size:I flags:I ioas_id:I fd:i start:Q length:Q iova:Q")
iommu_ioas_copy = CStruct(
    "iommu_ioas_copy",
    "size:I flags:I dst_ioas_id:I src_ioas_id:I length:Q dst_iova:Q src_iova:Q",
)
iommu_ioas_unmap = CStruct("iommu_ioas_unmap", "size:I ioas_id:I iova:Q length:Q")
iommu_option = CStruct("iommu_option", "size:I option_id:I op:H reserved:H object_id:I val64:Q")
iommu_vfio_ioas = CStruct("iommu_vfio_ioas", "size:I ioas_id:I op:H reserved:H")
iommu_hwpt_vtd_s1 = CStruct("iommu_hwpt_vtd_s1", "flags:Q pgtbl_addr:Q addr_width:I reserved:I")
iommu_hwpt_arm_smmuv3 = CStruct("iommu_hwpt_arm_smmuv3", "ste:2Q")
iommu_hwpt_amd_guest = CStruct("iommu_hwpt_amd_guest", "dte:4Q")
iommu_hwpt_alloc = CStruct(
    "iommu_hwpt_alloc",
    "size:I flags:I dev_id:I pt_id:I out_hwpt_id:I reserved:I"
    " data_type:I data_len:I data_uptr:Q fault_id:I reserved2:I",
)
iommu_hw_info_vtd = CStruct("iommu_hw_info_vtd", "flags:I reserved:I cap_reg:Q ecap_reg:Q")
iommu_hw_info_arm_smmuv3 = CStruct("iommu_hw_info_arm_smmuv3", "flags:I reserved:I idr:6I iidr:I aidr:I")
iommu_hw_info_tegra241_cmdqv = CStruct(
    "iommu_hw_info_tegra241_cmdqv", "flags:I version:B log2vcmdqs:B log2vsids:B reserved:B"
)
iommu_hw_info_amd = CStruct("iommu_hw_info_amd", "efr:Q efr2:Q")
iommu_hw_info = CStruct(
    "iommu_hw_info",
    "size:I flags:I dev_id:I data_len:I data_uptr:Q"
    " in_data_type|out_data_type:I out_max_pasid_log2:B reserved:3s out_capabilities:Q",
)
iommu_hwpt_set_dirty_tracking = CStruct("iommu_hwpt_set_dirty_tracking", "size:I flags:I hwpt_id:I reserved:I")
iommu_hwpt_get_dirty_bitmap = CStruct(
    "iommu_hwpt_get_dirty_bitmap",
    "size:I hwpt_id:I flags:I reserved:I iova:Q length:Q page_size:Q data:Q",
)
iommu_hwpt_vtd_s1_invalidate = CStruct("iommu_hwpt_vtd_s1_invalidate", "addr:Q npages:Q flags:I reserved:I")
iommu_viommu_arm_smmuv3_invalidate = CStruct("iommu_viommu_arm_smmuv3_invalidate", "cmd:2Q")
iommu_hwpt_invalidate = CStruct(
    "iommu_hwpt_invalidate",
    "size:I hwpt_id:I data_uptr:Q data_type:I entry_len:I entry_num:I reserved:I",
)
iommu_hwpt_pgfault = CStruct(
    "iommu_hwpt_pgfault",
    "flags:I dev_id:I pasid:I grpid:I perm:I reserved:I addr:Q length:I cookie:I",
)
iommu_hwpt_page_response = CStruct("iommu_hwpt_page_response", "cookie:I code:I")
iommu_fault_alloc = CStruct("iommu_fault_alloc", "size:I flags:I out_fault_id:I out_fault_fd:I")
iommu_viommu_tegra241_cmdqv = CStruct("iommu_viommu_tegra241_cmdqv", "out_vintf_mmap_offset:Q out_vintf_mmap_length:Q")
iommu_viommu_alloc = CStruct(
    "iommu_viommu_alloc",
    "size:I flags:I type:I dev_id:I hwpt_id:I out_viommu_id:I data_len:I reserved:I data_uptr:Q",
)
iommu_vdevice_alloc = CStruct("iommu_vdevice_alloc", "size:I viommu_id:I dev_id:I out_vdevice_id:I virt_id:Q")
iommu_ioas_change_process = CStruct("iommu_ioas_change_process", "size:I reserved:I")
iommufd_vevent_header = CStruct("iommufd_vevent_header", "flags:I sequence:I")
iommu_vevent_arm_smmuv3 = CStruct("iommu_vevent_arm_smmuv3", "evt:4Q")
iommu_vevent_tegra241_cmdqv = CStruct("iommu_vevent_tegra241_cmdqv", "lvcmdq_err_map:2Q")
iommu_veventq_alloc = CStruct(
    "iommu_veventq_alloc",
    "size:I flags:I viommu_id:I type:I veventq_depth:I out_veventq_id:I out_veventq_fd:I reserved:I",
)
iommu_hw_queue_alloc = CStruct(
    "iommu_hw_queue_alloc",
    "size:I flags:I viommu_id:I type:I index:I out_hw_queue_id:I nesting_parent_iova:Q length:Q",
)

# ---------------------------------------------------------------------------------------
# include/uapi/linux/vfio.h: constants

VFIO_API_VERSION = 0

# VFIO_CHECK_EXTENSION arguments
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10

VFIO_TYPE = ord(";")
VFIO_BASE = 100

VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_DEVICE_PCI_HOT_RESET = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_DEVICE_QUERY_GFX_PLANE = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_DEVICE_GET_GFX_DMABUF = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_DEVICE_IOEVENTFD = _IO(VFIO_TYPE, VFIO_BASE + 16)
VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)
VFIO_MIG_GET_PRECOPY_INFO = _IO(VFIO_TYPE, VFIO_BASE + 21)
# container (type1) ioctls, numbered over the device ones
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_IOMMU_ENABLE = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_IOMMU_DISABLE = _IO(VFIO_TYPE, VFIO_BASE + 16)
VFIO_IOMMU_DIRTY_PAGES = _IO(VFIO_TYPE, VFIO_BASE + 17)
# container (sPAPR) ioctls
VFIO_IOMMU_SPAPR_TCE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_SPAPR_REGISTER_MEMORY = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_IOMMU_SPAPR_TCE_CREATE = _IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_IOMMU_SPAPR_TCE_REMOVE = _IO(VFIO_TYPE, VFIO_BASE + 20)
VFIO_EEH_PE_OP = _IO(VFIO_TYPE, VFIO_BASE + 21)

# vfio_group_status.flags
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

# vfio_device_info.flags
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
VFIO_DEVICE_FLAGS_AMBA = 1 << 3
VFIO_DEVICE_FLAGS_CCW = 1 << 4
VFIO_DEVICE_FLAGS_AP = 1 << 5
VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
VFIO_DEVICE_FLAGS_CAPS = 1 << 7
VFIO_DEVICE_FLAGS_CDX = 1 << 8

# vfio_device_info capability ids
VFIO_DEVICE_INFO_CAP_ZPCI_BASE = 1
VFIO_DEVICE_INFO_CAP_ZPCI_GROUP = 2
VFIO_DEVICE_INFO_CAP_ZPCI_UTIL = 3
VFIO_DEVICE_INFO_CAP_ZPCI_PFIP = 4
VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP = 5
VFIO_PCI_ATOMIC_COMP32 = 1 << 0
VFIO_PCI_ATOMIC_COMP64 = 1 << 1
VFIO_PCI_ATOMIC_COMP128 = 1 << 2

# vfio_region_info.flags and capability ids
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
VFIO_REGION_INFO_CAP_NVLINK2_SSATGT = 4
VFIO_REGION_INFO_CAP_NVLINK2_LNKSPD = 5

# vfio_region_info_cap_type.type / subtype
VFIO_REGION_TYPE_PCI_VENDOR_TYPE = 0xFFFFFFFF80000000  # C: (1 << 31), an int; see top
VFIO_REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF
VFIO_REGION_TYPE_GFX = 1
VFIO_REGION_TYPE_CCW = 2
VFIO_REGION_TYPE_MIGRATION_DEPRECATED = 3
VFIO_REGION_SUBTYPE_INTEL_IGD_OPREGION = 1
VFIO_REGION_SUBTYPE_INTEL_IGD_HOST_CFG = 2
VFIO_REGION_SUBTYPE_INTEL_IGD_LPC_CFG = 3
VFIO_REGION_SUBTYPE_NVIDIA_NVLINK2_RAM = 1
VFIO_REGION_SUBTYPE_IBM_NVLINK2_ATSD = 1
VFIO_REGION_SUBTYPE_GFX_EDID = 1
VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD = 1
VFIO_REGION_SUBTYPE_CCW_SCHIB = 2
VFIO_REGION_SUBTYPE_CCW_CRW = 3
VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED = 1

# vfio_region_gfx_edid.link_state
VFIO_DEVICE_GFX_LINK_STATE_UP = 1
VFIO_DEVICE_GFX_LINK_STATE_DOWN = 2

# vfio_device_migration_info.device_state (v1 migration, deprecated)
VFIO_DEVICE_STATE_V1_STOP = 0
VFIO_DEVICE_STATE_V1_RUNNING = 1 << 0
VFIO_DEVICE_STATE_V1_SAVING = 1 << 1
VFIO_DEVICE_STATE_V1_RESUMING = 1 << 2
VFIO_DEVICE_STATE_MASK = VFIO_DEVICE_STATE_V1_RUNNING | VFIO_DEVICE_STATE_V1_SAVING | VFIO_DEVICE_STATE_V1_RESUMING

# vfio_irq_info.flags
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

# vfio_irq_set.flags
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_TYPE_MASK = VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER

# vfio-pci region and irq indexes
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_BAR3_REGION_INDEX = 3
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

# vfio-ccw and vfio-ap region and irq indexes
VFIO_CCW_CONFIG_REGION_INDEX = 0
VFIO_CCW_NUM_REGIONS = 1
VFIO_CCW_IO_IRQ_INDEX = 0
VFIO_CCW_CRW_IRQ_INDEX = 1
VFIO_CCW_REQ_IRQ_INDEX = 2
VFIO_CCW_NUM_IRQS = 3
VFIO_AP_REQ_IRQ_INDEX = 0
VFIO_AP_CFG_CHG_IRQ_INDEX = 1
VFIO_AP_NUM_IRQS = 2

# PCI hot reset: vfio_pci_dependent_device.devid, vfio_pci_hot_reset_info.flags
VFIO_PCI_DEVID_OWNED = 0
VFIO_PCI_DEVID_NOT_OWNED = 0xFFFFFFFFFFFFFFFF  # C: -1, an int; see top
VFIO_PCI_HOT_RESET_FLAG_DEV_ID = 1 << 0
VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED = 1 << 1

# vfio_device_gfx_plane_info.flags
VFIO_GFX_PLANE_TYPE_PROBE = 1 << 0
VFIO_GFX_PLANE_TYPE_DMABUF = 1 << 1
VFIO_GFX_PLANE_TYPE_REGION = 1 << 2

# vfio_device_ioeventfd.flags
VFIO_DEVICE_IOEVENTFD_8 = 1 << 0
VFIO_DEVICE_IOEVENTFD_16 = 1 << 1
VFIO_DEVICE_IOEVENTFD_32 = 1 << 2
VFIO_DEVICE_IOEVENTFD_64 = 1 << 3
VFIO_DEVICE_IOEVENTFD_SIZE_MASK = 0xF

# vfio_device_feature.flags: the feature number and the access bits
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18

# feature numbers
VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9
VFIO_DEVICE_FEATURE_BUS_MASTER = 10
VFIO_DEVICE_FEATURE_DMA_BUF = 11
VFIO_DEVICE_FEATURE_ZPCI_ERROR = 13

# vfio_device_feature_bus_master.op
VFIO_DEVICE_FEATURE_CLEAR_MASTER = 0
VFIO_DEVICE_FEATURE_SET_MASTER = 1

# device cdev: bind / attach / detach flags
VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0
VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_PASID = 1 << 0

# migration (v2)
VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2
VFIO_DEVICE_STATE_ERROR = 0
VFIO_DEVICE_STATE_STOP = 1
VFIO_DEVICE_STATE_RUNNING = 2
VFIO_DEVICE_STATE_STOP_COPY = 3
VFIO_DEVICE_STATE_RESUMING = 4
VFIO_DEVICE_STATE_RUNNING_P2P = 5
VFIO_DEVICE_STATE_PRE_COPY = 6
VFIO_DEVICE_STATE_PRE_COPY_P2P = 7
VFIO_DEVICE_STATE_NR = 8
VFIO_PRECOPY_INFO_REINIT = 1 << 0

# type1 container: vfio_iommu_type1_info.flags and capability ids
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3

# vfio_iommu_type1_dma_map.flags, vfio_iommu_type1_dma_unmap.flags
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2

# vfio_iommu_type1_dirty_bitmap.flags
VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1 << 0
VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 1 << 1
VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 1 << 2

# sPAPR TCE and EEH
VFIO_IOMMU_SPAPR_INFO_DDW = 1 << 0
VFIO_EEH_PE_DISABLE = 0
VFIO_EEH_PE_ENABLE = 1
VFIO_EEH_PE_UNFREEZE_IO = 2
VFIO_EEH_PE_UNFREEZE_DMA = 3
VFIO_EEH_PE_GET_STATE = 4
VFIO_EEH_PE_STATE_NORMAL = 0
VFIO_EEH_PE_STATE_RESET = 1
VFIO_EEH_PE_STATE_STOPPED = 2
VFIO_EEH_PE_STATE_STOPPED_DMA = 4
VFIO_EEH_PE_STATE_UNAVAIL = 5
VFIO_EEH_PE_RESET_DEACTIVATE = 5
VFIO_EEH_PE_RESET_HOT = 6
VFIO_EEH_PE_RESET_FUNDAMENTAL = 7
VFIO_EEH_PE_CONFIGURE = 8
VFIO_EEH_PE_INJECT_ERR = 9

# ---------------------------------------------------------------------------------------
# include/uapi/linux/vfio.h: structs

vfio_info_cap_header = CStruct("vfio_info_cap_header", "id:H version:H next:I")
vfio_group_status = CStruct("vfio_group_status", "argsz:I flags:I")
vfio_device_info = CStruct("vfio_device_info", "argsz:I flags:I num_regions:I num_irqs:I cap_offset:I pad:I")
vfio_device_info_cap_pci_atomic_comp = CStruct(
    "vfio_device_info_cap_pci_atomic_comp", "header:vfio_info_cap_header flags:I reserved:I"
)
vfio_region_info = CStruct("vfio_region_info", "argsz:I flags:I index:I cap_offset:I size:Q offset:Q")
vfio_region_sparse_mmap_area = CStruct("vfio_region_sparse_mmap_area", "offset:Q size:Q")
vfio_region_info_cap_sparse_mmap = CStruct(
    "vfio_region_info_cap_sparse_mmap",
    "header:vfio_info_cap_header nr_areas:I reserved:I areas:vfio_region_sparse_mmap_area[]",
)
vfio_region_info_cap_type = CStruct("vfio_region_info_cap_type", "header:vfio_info_cap_header type:I subtype:I")
vfio_region_gfx_edid = CStruct(
    "vfio_region_gfx_edid",
    "edid_offset:I edid_max_size:I edid_size:I max_xres:I max_yres:I link_state:I",
)
vfio_device_migration_info = CStruct(
    "vfio_device_migration_info",
    "device_state:I reserved:I pending_bytes:Q data_offset:Q data_size:Q",
)
vfio_region_info_cap_nvlink2_ssatgt = CStruct(
    "vfio_region_info_cap_nvlink2_ssatgt", "header:vfio_info_cap_header tgt:Q"
)
vfio_region_info_cap_nvlink2_lnkspd = CStruct(
    "vfio_region_info_cap_nvlink2_lnkspd", "header:vfio_info_cap_header link_speed:I pad:I"
)
vfio_irq_info = CStruct("vfio_irq_info", "argsz:I flags:I index:I count:I")
vfio_irq_set = CStruct("vfio_irq_set", "argsz:I flags:I index:I start:I count:I data:B[]")
vfio_pci_dependent_device = CStruct("vfio_pci_dependent_device", "group_id|devid:I segment:H bus:B devfn:B")
vfio_pci_hot_reset_info = CStruct(
    "vfio_pci_hot_reset_info", "argsz:I flags:I count:I devices:vfio_pci_dependent_device[]"
)
vfio_pci_hot_reset = CStruct("vfio_pci_hot_reset", "argsz:I flags:I count:I group_fds:i[]")
vfio_device_gfx_plane_info = CStruct(
    "vfio_device_gfx_plane_info",
    "argsz:I flags:I drm_plane_type:I drm_format:I drm_format_mod:Q width:I height:I"
    " stride:I size:I x_pos:I y_pos:I x_hot:I y_hot:I region_index|dmabuf_id:I reserved:I",
)
vfio_device_ioeventfd = CStruct("vfio_device_ioeventfd", "argsz:I flags:I offset:Q data:Q fd:i reserved:I")
vfio_device_feature = CStruct("vfio_device_feature", "argsz:I flags:I data:B[]")
vfio_device_bind_iommufd = CStruct("vfio_device_bind_iommufd", "argsz:I flags:I iommufd:i out_devid:I token_uuid_ptr:Q")
vfio_device_attach_iommufd_pt = CStruct("vfio_device_attach_iommufd_pt", "argsz:I flags:I pt_id:I pasid:I")
vfio_device_detach_iommufd_pt = CStruct("vfio_device_detach_iommufd_pt", "argsz:I flags:I pasid:I")
vfio_device_feature_migration = CStruct("vfio_device_feature_migration", "flags:Q")
vfio_device_feature_mig_state = CStruct("vfio_device_feature_mig_state", "device_state:I data_fd:i")
vfio_precopy_info = CStruct("vfio_precopy_info", "argsz:I flags:I initial_bytes:Q dirty_bytes:Q")
vfio_device_low_power_entry_with_wakeup = CStruct(
    "vfio_device_low_power_entry_with_wakeup", "wakeup_eventfd:i reserved:I"
)
vfio_device_feature_dma_logging_control = CStruct(
    "vfio_device_feature_dma_logging_control", "page_size:Q num_ranges:I reserved:I ranges:Q"
)
vfio_device_feature_dma_logging_range = CStruct("vfio_device_feature_dma_logging_range", "iova:Q length:Q")
vfio_device_feature_dma_logging_report = CStruct(
    "vfio_device_feature_dma_logging_report", "iova:Q length:Q page_size:Q bitmap:Q"
)
vfio_device_feature_mig_data_size = CStruct("vfio_device_feature_mig_data_size", "stop_copy_length:Q")
vfio_device_feature_bus_master = CStruct("vfio_device_feature_bus_master", "op:I")
vfio_region_dma_range = CStruct("vfio_region_dma_range", "offset:Q length:Q")
vfio_device_feature_dma_buf = CStruct(
    "vfio_device_feature_dma_buf",
    "region_index:I open_flags:I flags:I nr_ranges:I dma_ranges:vfio_region_dma_range[]",
)
vfio_device_feature_zpci_err = CStruct("vfio_device_feature_zpci_err", "data:Q")
vfio_iommu_type1_info = CStruct("vfio_iommu_type1_info", "argsz:I flags:I iova_pgsizes:Q cap_offset:I pad:I")
vfio_iova_range = CStruct("vfio_iova_range", "start:Q end:Q")
vfio_iommu_type1_info_cap_iova_range = CStruct(
    "vfio_iommu_type1_info_cap_iova_range",
    "header:vfio_info_cap_header nr_iovas:I reserved:I iova_ranges:vfio_iova_range[]",
)
vfio_iommu_type1_info_cap_migration = CStruct(
    "vfio_iommu_type1_info_cap_migration",
    "header:vfio_info_cap_header flags:I 4x pgsize_bitmap:Q max_dirty_bitmap_size:Q",
)
vfio_iommu_type1_info_dma_avail = CStruct("vfio_iommu_type1_info_dma_avail", "header:vfio_info_cap_header avail:I")
vfio_iommu_type1_dma_map = CStruct("vfio_iommu_type1_dma_map", "argsz:I flags:I vaddr:Q iova:Q size:Q")
vfio_bitmap = CStruct("vfio_bitmap", "pgsize:Q size:Q data:Q")
vfio_iommu_type1_dma_unmap = CStruct("vfio_iommu_type1_dma_unmap", "argsz:I flags:I iova:Q size:Q data:B[]")
vfio_iommu_type1_dirty_bitmap = CStruct("vfio_iommu_type1_dirty_bitmap", "argsz:I flags:I data:B[]")
vfio_iommu_type1_dirty_bitmap_get = CStruct("vfio_iommu_type1_dirty_bitmap_get", "iova:Q size:Q bitmap:vfio_bitmap")
vfio_iommu_spapr_tce_ddw_info = CStruct(
    "vfio_iommu_spapr_tce_ddw_info", "pgsizes:Q max_dynamic_windows_supported:I levels:I"
)
vfio_iommu_spapr_tce_info = CStruct(
    "vfio_iommu_spapr_tce_info",
    "argsz:I flags:I dma32_window_start:I dma32_window_size:I ddw:vfio_iommu_spapr_tce_ddw_info",
)
vfio_eeh_pe_err = CStruct("vfio_eeh_pe_err", "type:I func:I addr:Q mask:Q")
vfio_eeh_pe_op = CStruct("vfio_eeh_pe_op", "argsz:I flags:I op:I 4x err:vfio_eeh_pe_err")
vfio_iommu_spapr_register_memory = CStruct("vfio_iommu_spapr_register_memory", "argsz:I flags:I vaddr:Q size:Q")
vfio_iommu_spapr_tce_create = CStruct(
    "vfio_iommu_spapr_tce_create",
    "argsz:I flags:I page_shift:I resv1:I window_size:Q levels:I resv2:I start_addr:Q",
)
vfio_iommu_spapr_tce_remove = CStruct("vfio_iommu_spapr_tce_remove", "argsz:I flags:I start_addr:Q")

# ---------------------------------------------------------------------------------------
# drivers/iommu/iommufd/iommufd_test.h: constants

IOMMU_TEST_CMD = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 32)

# iommu_test_cmd.op
IOMMU_TEST_OP_ADD_RESERVED = 1
IOMMU_TEST_OP_MOCK_DOMAIN = 2
IOMMU_TEST_OP_MD_CHECK_MAP = 3
IOMMU_TEST_OP_MD_CHECK_REFS = 4
IOMMU_TEST_OP_CREATE_ACCESS = 5
IOMMU_TEST_OP_DESTROY_ACCESS_PAGES = 6
IOMMU_TEST_OP_ACCESS_PAGES = 7
IOMMU_TEST_OP_ACCESS_RW = 8
IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT = 9
IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE = 10
IOMMU_TEST_OP_ACCESS_REPLACE_IOAS = 11
IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS = 12
IOMMU_TEST_OP_DIRTY = 13
IOMMU_TEST_OP_MD_CHECK_IOTLB = 14
IOMMU_TEST_OP_TRIGGER_IOPF = 15
IOMMU_TEST_OP_DEV_CHECK_CACHE = 16
IOMMU_TEST_OP_TRIGGER_VEVENT = 17
IOMMU_TEST_OP_PASID_ATTACH = 18
IOMMU_TEST_OP_PASID_REPLACE = 19
IOMMU_TEST_OP_PASID_DETACH = 20
IOMMU_TEST_OP_PASID_CHECK_HWPT = 21
IOMMU_TEST_OP_DMABUF_GET = 22
IOMMU_TEST_OP_DMABUF_REVOKE = 23

# the mock IOMMU
MOCK_IOMMUPT_DEFAULT = 0
MOCK_IOMMUPT_HUGE = 1
MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1
MOCK_PAGE_SIZE = 2048
MOCK_HUGE_PAGE_SIZE = 1 << 20
MOCK_PASID_WIDTH = 20
MOCK_NESTED_DOMAIN_IOTLB_ID_MAX = 3
MOCK_NESTED_DOMAIN_IOTLB_NUM = 4
MOCK_DEV_CACHE_ID_MAX = 3
MOCK_DEV_CACHE_NUM = 4

# create_access.flags, access_rw.flags, access_pages.flags, mock_domain_flags.dev_flags
MOCK_FLAGS_ACCESS_WRITE = 1 << 0
MOCK_FLAGS_ACCESS_SYZ = 1 << 16
MOCK_ACCESS_RW_WRITE = 1 << 0
MOCK_ACCESS_RW_SLOW_PATH = 1 << 2
MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES = 1 << 0
MOCK_FLAGS_DEVICE_NO_DIRTY = 1 << 0
MOCK_FLAGS_DEVICE_PASID = 1 << 2

IOMMU_TEST_PASID_RESERVED = 1024

# driver-specific data types and values of the mock driver
IOMMU_HW_INFO_TYPE_SELFTEST = 0xFEEDBEEF
IOMMU_HW_INFO_SELFTEST_REGVAL = 0xDEADBEEF
IOMMU_HWPT_DATA_SELFTEST = 0xDEAD
IOMMU_TEST_IOTLB_DEFAULT = 0xBADBEEF
IOMMU_TEST_DEV_CACHE_DEFAULT = 0xBADDAD
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF
IOMMU_TEST_INVALIDATE_FLAG_ALL = 1 << 0
IOMMU_VIOMMU_TYPE_SELFTEST = 0xDEADBEEF
IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF
IOMMU_VEVENTQ_TYPE_SELFTEST = 0xBEEFBEEF
IOMMU_HW_QUEUE_TYPE_SELFTEST = 0xDEADBEEF
IOMMU_TEST_HW_QUEUE_MAX = 2

# ---------------------------------------------------------------------------------------
# drivers/iommu/iommufd/iommufd_test.h: structs

iommu_test_cmd = CStruct("iommu_test_cmd", "size:I op:I id:I reserved:I data:48s last:I 4x")
IOMMU_TEST_CMD_UNION_OFFSET = offsetof(iommu_test_cmd, "data")

#: The members of iommu_test_cmd's union, each laid at IOMMU_TEST_CMD_UNION_OFFSET.
IOMMU_TEST_CMD_UNION: dict[str, CStruct] = {
    member: CStruct(f"iommu_test_cmd.{member}", spec)
    for member, spec in {
        "add_reserved": "start:Q length:Q",
        "mock_domain": "out_stdev_id:I out_hwpt_id:I out_idev_id:I",
        "mock_domain_flags": "out_stdev_id:I out_hwpt_id:I out_idev_id:I dev_flags:I",
        "mock_domain_replace": "pt_id:I",
        "check_map": "iova:Q length:Q uptr:Q",
        "check_refs": "length:Q uptr:Q refs:I 4x",
        "create_access": "out_access_fd:I flags:I",
        "destroy_access_pages": "access_pages_id:I",
        "access_pages": "flags:I out_access_pages_id:I iova:Q length:Q uptr:Q",
        "access_rw": "iova:Q length:Q uptr:Q flags:I 4x",
        "memory_limit": "limit:I",
        "access_replace_ioas": "ioas_id:I",
        "dirty": "flags:I 4x iova:Q length:Q page_size:Q uptr:Q out_nr_dirty:Q",
        "check_iotlb": "id:I iotlb:I",
        "trigger_iopf": "dev_id:I pasid:I grpid:I perm:I addr:Q",
        "check_dev_cache": "id:I cache:I",
        "trigger_vevent": "dev_id:I",
        "pasid_attach": "pasid:I pt_id:I",
        "pasid_replace": "pasid:I pt_id:I",
        "pasid_detach": "pasid:I",
        "pasid_check": "pasid:I hwpt_id:I",
        "dmabuf_get": "length:I open_flags:I",
        "dmabuf_revoke": "dmabuf_fd:i revoked:I",
    }.items()
}

#: iommu_test_cmd.op -> the union member that op reads and writes.
IOMMU_TEST_OP_STRUCTS: dict[int, CStruct] = {
    IOMMU_TEST_OP_ADD_RESERVED: IOMMU_TEST_CMD_UNION["add_reserved"],
    IOMMU_TEST_OP_MOCK_DOMAIN: IOMMU_TEST_CMD_UNION["mock_domain"],
    IOMMU_TEST_OP_MD_CHECK_MAP: IOMMU_TEST_CMD_UNION["check_map"],
    IOMMU_TEST_OP_MD_CHECK_REFS: IOMMU_TEST_CMD_UNION["check_refs"],
    IOMMU_TEST_OP_CREATE_ACCESS: IOMMU_TEST_CMD_UNION["create_access"],
    IOMMU_TEST_OP_DESTROY_ACCESS_PAGES: IOMMU_TEST_CMD_UNION["destroy_access_pages"],
    IOMMU_TEST_OP_ACCESS_PAGES: IOMMU_TEST_CMD_UNION["access_pages"],
    IOMMU_TEST_OP_ACCESS_RW: IOMMU_TEST_CMD_UNION["access_rw"],
    IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT: IOMMU_TEST_CMD_UNION["memory_limit"],
    IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: IOMMU_TEST_CMD_UNION["mock_domain_replace"],
    IOMMU_TEST_OP_ACCESS_REPLACE_IOAS: IOMMU_TEST_CMD_UNION["access_replace_ioas"],
    IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS: IOMMU_TEST_CMD_UNION["mock_domain_flags"],
    IOMMU_TEST_OP_DIRTY: IOMMU_TEST_CMD_UNION["dirty"],
    IOMMU_TEST_OP_MD_CHECK_IOTLB: IOMMU_TEST_CMD_UNION["check_iotlb"],
    IOMMU_TEST_OP_TRIGGER_IOPF: IOMMU_TEST_CMD_UNION["trigger_iopf"],
    IOMMU_TEST_OP_DEV_CHECK_CACHE: IOMMU_TEST_CMD_UNION["check_dev_cache"],
    IOMMU_TEST_OP_TRIGGER_VEVENT: IOMMU_TEST_CMD_UNION["trigger_vevent"],
    IOMMU_TEST_OP_PASID_ATTACH: IOMMU_TEST_CMD_UNION["pasid_attach"],
    IOMMU_TEST_OP_PASID_REPLACE: IOMMU_TEST_CMD_UNION["pasid_replace"],
    IOMMU_TEST_OP_PASID_DETACH: IOMMU_TEST_CMD_UNION["pasid_detach"],
    IOMMU_TEST_OP_PASID_CHECK_HWPT: IOMMU_TEST_CMD_UNION["pasid_check"],
    IOMMU_TEST_OP_DMABUF_GET: IOMMU_TEST_CMD_UNION["dmabuf_get"],
    IOMMU_TEST_OP_DMABUF_REVOKE: IOMMU_TEST_CMD_UNION["dmabuf_revoke"],
}

# The mock driver's data structs. shared/abi/ has no rows for these: they are checked only
# for natural alignment here, and their layout follows the MOCK_IOMMUPT-era header.
iommu_test_hw_info = CStruct("iommu_test_hw_info", "flags:I test_reg:I")
iommu_hwpt_selftest = CStruct("iommu_hwpt_selftest", "iotlb:I pagetable_type:I")
iommu_hwpt_invalidate_selftest = CStruct("iommu_hwpt_invalidate_selftest", "flags:I iotlb_id:I")
iommu_viommu_selftest = CStruct("iommu_viommu_selftest", "in_data:I out_data:I out_mmap_offset:Q out_mmap_length:Q")
iommu_viommu_invalidate_selftest = CStruct("iommu_viommu_invalidate_selftest", "flags:I vdev_id:I cache_id:I")
iommu_viommu_event_selftest = CStruct("iommu_viommu_event_selftest", "virt_id:I")

# ---------------------------------------------------------------------------------------
# The /dev/iommu ioctl table: number -> (struct, min size). A call whose size is below the
# min size is EINVAL; the min size is the end of the last member the first version of the
# struct had.


def _ioctl(s: CStruct, last: str) -> tuple[CStruct, int]:
    return s, offsetofend(s, last)


IOCTL_STRUCTS: dict[int, tuple[CStruct, int]] = {
    IOMMU_DESTROY: _ioctl(iommu_destroy, "id"),
    IOMMU_IOAS_ALLOC: _ioctl(iommu_ioas_alloc, "out_ioas_id"),
    IOMMU_IOAS_ALLOW_IOVAS: _ioctl(iommu_ioas_allow_iovas, "allowed_iovas"),
    IOMMU_IOAS_COPY: _ioctl(iommu_ioas_copy, "src_iova"),
    IOMMU_IOAS_IOVA_RANGES: _ioctl(iommu_ioas_iova_ranges, "out_iova_alignment"),
    IOMMU_IOAS_MAP: _ioctl(iommu_ioas_map, "iova"),
    IOMMU_IOAS_UNMAP: _ioctl(iommu_ioas_unmap, "length"),
    IOMMU_OPTION: _ioctl(iommu_option, "val64"),
    IOMMU_VFIO_IOAS: _ioctl(iommu_vfio_ioas, "reserved"),
    IOMMU_HWPT_ALLOC: _ioctl(iommu_hwpt_alloc, "reserved"),
    IOMMU_GET_HW_INFO: _ioctl(iommu_hw_info, "reserved"),
    IOMMU_HWPT_SET_DIRTY_TRACKING: _ioctl(iommu_hwpt_set_dirty_tracking, "reserved"),
    IOMMU_HWPT_GET_DIRTY_BITMAP: _ioctl(iommu_hwpt_get_dirty_bitmap, "data"),
    IOMMU_HWPT_INVALIDATE: _ioctl(iommu_hwpt_invalidate, "reserved"),
    IOMMU_FAULT_QUEUE_ALLOC: _ioctl(iommu_fault_alloc, "out_fault_fd"),
    IOMMU_IOAS_MAP_FILE: _ioctl(iommu_ioas_map_file, "iova"),
    IOMMU_VIOMMU_ALLOC: _ioctl(iommu_viommu_alloc, "out_viommu_id"),
    IOMMU_VDEVICE_ALLOC: _ioctl(iommu_vdevice_alloc, "virt_id"),
    IOMMU_IOAS_CHANGE_PROCESS: _ioctl(iommu_ioas_change_process, "reserved"),
    IOMMU_VEVENTQ_ALLOC: _ioctl(iommu_veventq_alloc, "out_veventq_fd"),
    IOMMU_HW_QUEUE_ALLOC: _ioctl(iommu_hw_queue_alloc, "length"),
    IOMMU_IOAS_NOIOMMU_GET_PA: _ioctl(iommu_ioas_noiommu_get_pa, "out_phys"),
    # only in kernels built with CONFIG_IOMMUFD_TEST
    IOMMU_TEST_CMD: _ioctl(iommu_test_cmd, "last"),
}
