"""HWPT objects: IOMMU domains as iommufd objects (drivers/iommu/iommufd/hw_pagetable.c).

A paging HWPT wraps a domain of the device's IOMMU loaded with every area of
its IOAS; it holds a users reference on the IOAS. Automatic HWPTs are made by
attaching a device to an IOAS and go away with their last device.

A nested HWPT wraps a stage-1 domain the driver builds from user data on a
paging parent allocated with IOMMU_HWPT_ALLOC_NEST_PARENT; it holds a users
reference on the parent, and devices attach to it as to a paging HWPT (their
reserved regions go to the parent's IOAS). Only an IOMMU whose driver has
domain_alloc_nested nests: here, the selftest's mock IOMMU.
"""

from __future__ import annotations

import errno
import logging

import trio

from .. import uapi
from ..errors import Errno
from ..iommu.domain import PagingDomain
from ..system import PAGE_SIZE
from .object import Context, Object, ObjType, Ucmd, copy_struct_from_user

log = logging.getLogger(__name__)

ULONG_MAX = (1 << 64) - 1

HWPT_ALLOC_FLAGS = (
    uapi.IOMMU_HWPT_ALLOC_NEST_PARENT
    | uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    | uapi.IOMMU_HWPT_FAULT_ID_VALID
    | uapi.IOMMU_HWPT_ALLOC_PASID
)


class HwptPaging(Object):
    type = ObjType.HWPT_PAGING

    def __init__(self, ctx: Context, ioas, domain: PagingDomain, auto: bool = False) -> None:  # noqa: ANN001
        super().__init__()
        self.ctx = ctx
        self.ioas = ioas
        self.domain = domain
        self.auto_domain = auto
        self.nest_parent = False
        self.pasid_compat = False  # allocated with IOMMU_HWPT_ALLOC_PASID
        self.in_iopt = False
        self.fault = None  # the fault object of IOMMU_HWPT_FAULT_ID_VALID

    async def load(self) -> None:
        """Add the domain to the IOAS: every area is mapped (and pinned) into it."""
        iopt = self.ioas.iopt
        async with iopt.lock:
            await iopt.add_domain(self.domain)
        self.in_iopt = True
        self.ioas.users += 1
        self.ioas.hwpts.append(self)

    def destroy(self) -> None:
        _put_fault(self)
        if self.in_iopt:
            iopt = self.ioas.iopt
            if iopt.lock.locked():
                log.warning("destroying %r while its IOAS is busy", self)
            iopt.remove_domain(self.domain)
            self.ioas.hwpts.remove(self)
            self.ioas.users -= 1
            self.in_iopt = False


class HwptNested(Object):
    """struct iommufd_hwpt_nested: a nested domain on a paging parent."""

    type = ObjType.HWPT_NESTED
    auto_domain = False

    def __init__(self, ctx: Context, parent: HwptPaging, viommu=None) -> None:  # noqa: ANN001
        super().__init__()
        self.ctx = ctx
        self.parent = parent
        self.viommu = viommu  # allocated on a vIOMMU: it holds the vIOMMU, not the parent
        self.domain = None  # set by the driver once allocated
        self.pasid_compat = False  # allocated with IOMMU_HWPT_ALLOC_PASID
        self.fault = None  # the fault object of IOMMU_HWPT_FAULT_ID_VALID
        (viommu if viommu is not None else parent).users += 1  # released by destroy (and abort)

    @property
    def ioas(self):  # noqa: ANN201
        """The IOAS of the parent: where attached devices' reserved regions go."""
        return self.parent.ioas

    def status(self) -> dict:
        if self.viommu is not None:
            return {"parent": self.parent.id, "viommu": self.viommu.id}
        return {"parent": self.parent.id}

    def destroy(self) -> None:
        _put_fault(self)
        if self.viommu is not None:
            self.viommu.users -= 1
            self.viommu = None
        elif self.parent is not None:
            self.parent.users -= 1
        self.parent = None  # type: ignore[assignment]


def _put_fault(hwpt) -> None:  # noqa: ANN001
    """A HWPT going away lets go of its fault object; the groups it queued there
    are answered (dropped), as iommufd_auto_response_faults at its last detach."""
    fault, hwpt.fault = hwpt.fault, None
    if fault is not None:
        fault.auto_respond(hwpt=hwpt)
        fault.users -= 1


class UserData:
    """struct iommu_user_data: driver-specific data a HWPT_ALLOC carries, read by
    the driver when it wants it (iommu_copy_struct_from_user)."""

    def __init__(self, caller, data_type: int, uptr: int, length: int) -> None:  # noqa: ANN001
        self.caller = caller
        self.type = data_type
        self.uptr = uptr
        self.len = length

    def copy_struct(self, data_type: int, struct, last: str):  # noqa: ANN001, ANN201
        """iommu_copy_struct_from_user: the struct of data_type, at least up to its
        member last. Another type, a length shorter than that or longer than the
        struct is EINVAL (the kernel helper refuses a user struct bigger than its
        own, whatever the tail holds); an unreadable pointer is EFAULT."""
        return _copy_user_struct(self.caller, self.type, self.uptr, self.len, data_type, struct, last)


def _copy_user_struct(
    caller,
    src_type: int,
    uptr: int,
    length: int,
    data_type: int,  # noqa: ANN001, ANN202
    struct,
    last: str,
):  # noqa: ANN001
    if src_type != data_type:
        raise Errno(errno.EINVAL)
    if length < uapi.offsetofend(struct, last) or length > struct.SIZE:
        raise Errno(errno.EINVAL)
    return struct.unpack(copy_struct_from_user(caller, uptr, struct.SIZE, length))


class UserDataArray:
    """struct iommu_user_data_array: the entries of an IOMMU_HWPT_INVALIDATE. The
    driver sets entry_num to the number of entries it handled."""

    def __init__(self, caller, data_type: int, uptr: int, entry_len: int, entry_num: int) -> None:  # noqa: ANN001
        self.caller = caller
        self.type = data_type
        self.uptr = uptr
        self.entry_len = entry_len
        self.entry_num = entry_num

    def copy_entry(self, index: int, data_type: int, struct, last: str):  # noqa: ANN001, ANN201
        """iommu_copy_struct_from_user_array: entry index, with copy_struct's rules
        (another type, entry_len shorter than up to last or longer than the struct:
        EINVAL; an unreadable entry: EFAULT)."""
        if index >= self.entry_num:
            raise Errno(errno.EINVAL)
        addr = (self.uptr + self.entry_len * index) & ULONG_MAX
        return _copy_user_struct(self.caller, self.type, addr, self.entry_len, data_type, struct, last)


async def hwpt_paging_alloc(
    ctx: Context,
    ioas,
    idev,
    flags: int,
    auto: bool = False,  # noqa: ANN001
    user_data: UserData | None = None,
) -> HwptPaging:
    """iommufd_hwpt_paging_alloc: a new domain of idev's IOMMU for ioas (not yet finalized)."""
    iommu = idev.device.iommu
    if flags & ~HWPT_ALLOC_FLAGS:
        raise Errno(errno.EOPNOTSUPP)
    domain = iommu.domain_alloc_user(idev.device, flags, user_data)
    hwpt = ctx.alloc(HwptPaging(ctx, ioas, domain, auto))
    hwpt.nest_parent = bool(flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    hwpt.pasid_compat = bool(flags & uapi.IOMMU_HWPT_ALLOC_PASID)
    try:
        await hwpt.load()
    except BaseException:
        with trio.CancelScope(shield=True):
            ctx.abort(hwpt)
        raise
    return hwpt


NESTED_ALLOC_FLAGS = uapi.IOMMU_HWPT_FAULT_ID_VALID | uapi.IOMMU_HWPT_ALLOC_PASID


def hwpt_nested_alloc(
    ctx: Context,
    parent: HwptPaging,
    idev,
    flags: int,  # noqa: ANN001
    user_data: UserData,
) -> HwptNested:
    """iommufd_hwpt_nested_alloc: a nested domain of idev's IOMMU on parent (not yet
    finalized). Flags other than FAULT_ID_VALID and PASID, no data, or a driver
    without nesting: EOPNOTSUPP; a parent that is automatic, not allocated with
    NEST_PARENT, or of another driver: EINVAL."""
    iommu = idev.device.iommu
    if flags & ~NESTED_ALLOC_FLAGS or not user_data.len or not iommu.nesting:
        if not iommu.nesting:
            log.info("HWPT_ALLOC of a nested domain: %s has no nesting", iommu.name)
        raise Errno(errno.EOPNOTSUPP)
    if parent.auto_domain or not parent.nest_parent or type(getattr(parent.domain, "iommu", None)) is not type(iommu):
        raise Errno(errno.EINVAL)
    hwpt = ctx.alloc(HwptNested(ctx, parent))
    hwpt.pasid_compat = bool(flags & uapi.IOMMU_HWPT_ALLOC_PASID)
    try:
        hwpt.domain = iommu.domain_alloc_nested(
            idev.device, parent.domain, flags & ~uapi.IOMMU_HWPT_FAULT_ID_VALID, user_data
        )
    except BaseException:
        ctx.abort(hwpt)
        raise
    return hwpt


def hwpt_viommu_nested_alloc(
    ctx: Context,
    viommu,
    idev,
    flags: int,  # noqa: ANN001
    user_data: UserData,
) -> HwptNested:
    """iommufd_viommu_alloc_hwpt_nested: a nested domain the vIOMMU's driver builds
    (not yet finalized). A device of another IOMMU EINVAL; flags other than
    FAULT_ID_VALID and PASID, or no data, EOPNOTSUPP."""
    iommu = idev.device.iommu
    if viommu.iommu is not iommu:
        raise Errno(errno.EINVAL)
    if flags & ~NESTED_ALLOC_FLAGS or not user_data.len:
        raise Errno(errno.EOPNOTSUPP)
    hwpt = ctx.alloc(HwptNested(ctx, viommu.hwpt, viommu))
    hwpt.pasid_compat = bool(flags & uapi.IOMMU_HWPT_ALLOC_PASID)
    try:
        hwpt.domain = iommu.viommu_alloc_domain_nested(viommu, flags & ~uapi.IOMMU_HWPT_FAULT_ID_VALID, user_data)
    except BaseException:
        ctx.abort(hwpt)
        raise
    return hwpt


async def hwpt_alloc(ucmd: Ucmd) -> int:
    """IOMMU_HWPT_ALLOC."""
    cmd = ucmd.cmd
    ctx = ucmd.ctx
    if cmd.reserved or cmd.reserved2:
        raise Errno(errno.EOPNOTSUPP)
    if (cmd.data_type == uapi.IOMMU_HWPT_DATA_NONE and cmd.data_len) or (
        cmd.data_type != uapi.IOMMU_HWPT_DATA_NONE and not cmd.data_len
    ):
        raise Errno(errno.EINVAL)  # a null data_uptr is the driver's copy to fail (EFAULT)
    idev = ctx.get(cmd.dev_id, ObjType.DEVICE)
    try:
        pt = ctx.get(cmd.pt_id)
    except Errno:
        raise Errno(errno.EINVAL) from None  # mainline: an unknown pt_id is EINVAL, not ENOENT
    user_data = UserData(ucmd.caller, cmd.data_type, cmd.data_uptr, cmd.data_len)
    with ctx.hold(idev), ctx.hold(pt):
        if pt.type is ObjType.IOAS:
            hwpt = await hwpt_paging_alloc(ctx, pt, idev, cmd.flags, user_data=user_data if cmd.data_len else None)
        elif pt.type is ObjType.HWPT_PAGING:
            hwpt = hwpt_nested_alloc(ctx, pt, idev, cmd.flags, user_data)
        elif pt.type is ObjType.VIOMMU:
            hwpt = hwpt_viommu_nested_alloc(ctx, pt, idev, cmd.flags, user_data)
        else:
            raise Errno(errno.EINVAL)  # a nested HWPT is no parent; nor is any other object
    if cmd.flags & uapi.IOMMU_HWPT_FAULT_ID_VALID:
        # The fault object (IOMMU_FAULT_QUEUE_ALLOC): anything else is ENOENT.
        try:
            fault = ctx.get(cmd.fault_id, ObjType.FAULT)
        except BaseException:
            ctx.abort(hwpt)
            raise
        hwpt.fault = fault
        fault.users += 1  # released by the HWPT's destroy
    cmd.out_hwpt_id = hwpt.id
    ucmd.respond_and_finalize(hwpt)
    return 0


# -- IOMMU_HWPT_INVALIDATE ----------------------------------------------------------------
HWPT_INVALIDATE_ENTRY_NUM_MAX = 1 << 19  # mainline's cap on entry_num


def hwpt_invalidate(ucmd: Ucmd) -> int:
    """IOMMU_HWPT_INVALIDATE: hand an array of entry_num driver-defined entries of
    entry_len bytes to the nested domain's cache_invalidate_user. entry_num is
    written back as the number of entries handled, whatever the outcome (if that
    write fails: EFAULT). A non-zero reserved is EOPNOTSUPP; entries without a
    pointer or a length, longer than PAGE_SIZE or more than 2^19 of them EINVAL; an unknown id ENOENT; a nested domain whose driver
    cannot invalidate EOPNOTSUPP; a vIOMMU hands the array to its driver's
    cache_invalidate; any other object EINVAL."""
    cmd = ucmd.cmd
    done = 0
    err: Errno | None = None
    try:
        if cmd.reserved:
            raise Errno(errno.EOPNOTSUPP)
        # Bounded so that one call cannot keep the daemon busy (and the zero-tail scan
        # of an entry stays short), as mainline.
        if cmd.entry_num and (
            not cmd.data_uptr
            or not cmd.entry_len
            or cmd.entry_len > PAGE_SIZE
            or cmd.entry_num > HWPT_INVALIDATE_ENTRY_NUM_MAX
        ):
            raise Errno(errno.EINVAL)
        obj = ucmd.ctx.get(cmd.hwpt_id)
        if obj.type is ObjType.HWPT_NESTED:
            invalidate = getattr(obj.domain, "cache_invalidate_user", None)
        elif obj.type is ObjType.VIOMMU:
            invalidate = getattr(obj.iommu, "viommu_cache_invalidate", None)
            if invalidate is not None:
                invalidate = (lambda f, v: lambda array: f(v, array))(invalidate, obj)
        else:
            raise Errno(errno.EINVAL)
        if invalidate is None:
            raise Errno(errno.EOPNOTSUPP)
        array = UserDataArray(ucmd.caller, cmd.data_type, cmd.data_uptr, cmd.entry_len, cmd.entry_num)
        try:
            invalidate(array)
        finally:
            done = array.entry_num
    except Errno as e:
        err = e
    cmd.entry_num = done
    try:
        ucmd.respond()
    except Errno:
        raise Errno(errno.EFAULT) from None
    if err is not None:
        raise err
    return 0


# -- dirty tracking ---------------------------------------------------------------------
def _get_hwpt_paging(ctx: Context, hwpt_id: int) -> HwptPaging:
    return ctx.get(hwpt_id, ObjType.HWPT_PAGING)


def hwpt_set_dirty_tracking(ucmd: Ucmd) -> int:
    """IOMMU_HWPT_SET_DIRTY_TRACKING: enabling first clears what was recorded before."""
    cmd = ucmd.cmd
    if cmd.flags & ~uapi.IOMMU_HWPT_DIRTY_TRACKING_ENABLE:
        raise Errno(errno.EOPNOTSUPP)
    hwpt = _get_hwpt_paging(ucmd.ctx, cmd.hwpt_id)
    domain = hwpt.domain
    if not domain.dirty_tracking_capable:
        raise Errno(errno.EOPNOTSUPP)  # allocated without IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    enable = bool(cmd.flags & uapi.IOMMU_HWPT_DIRTY_TRACKING_ENABLE)
    if enable and not domain.dirty_tracking:
        domain.clear_dirty()
    domain.dirty_tracking = enable
    return 0


async def hwpt_get_dirty_bitmap(ucmd: Ucmd) -> int:
    """IOMMU_HWPT_GET_DIRTY_BITMAP: OR the dirty pages of [iova, iova+length) into the
    user's bitmap (one bit per page_size), clearing them unless NO_CLEAR."""
    cmd = ucmd.cmd
    if cmd.flags & ~uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR or cmd.reserved:
        raise Errno(errno.EOPNOTSUPP)
    ctx = ucmd.ctx
    hwpt = _get_hwpt_paging(ctx, cmd.hwpt_id)
    iopt = hwpt.ioas.iopt
    last = cmd.iova + cmd.length - 1
    if cmd.length == 0 or last > (1 << 64) - 1:
        raise Errno(errno.EOVERFLOW)
    align = iopt.iova_alignment
    if cmd.iova & (align - 1) or (last + 1) & (align - 1) or not cmd.page_size:
        raise Errno(errno.EINVAL)
    if cmd.iova % cmd.page_size or (last + 1) % cmd.page_size:
        raise Errno(errno.EINVAL)
    domain = hwpt.domain
    if not domain.dirty_tracking_capable:
        raise Errno(errno.EOPNOTSUPP)
    if not domain.dirty_tracking:
        raise Errno(errno.EINVAL)  # the drivers refuse a bitmap while tracking is off
    nbits = cmd.length // cmd.page_size
    nbytes = (nbits + 63) // 64 * 8
    if nbytes > 64 << 20:
        raise Errno(errno.ENOMEM)
    with ctx.hold(hwpt):
        bitmap = bytearray(ucmd.caller.read(cmd.data, nbytes))
        no_clear = bool(cmd.flags & uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR)
        # Only the areas are walked, as the kernel does (holes are never dirty).
        for area in iopt.areas_in(cmd.iova, last):
            s, e = max(area.start, cmd.iova), min(area.last, last)
            await trio.to_thread.run_sync(domain.read_dirty, s, e - s + 1, cmd.page_size, cmd.iova, bitmap, no_clear)
        ucmd.caller.write(cmd.data, bitmap)
    return 0
