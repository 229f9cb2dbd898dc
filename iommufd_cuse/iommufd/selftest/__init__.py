"""The kernel's test interface, IOMMU_TEST_CMD, and its mock IOMMU
(drivers/iommu/iommufd/selftest.c, iommufd_test.h), served in test mode only
(`iommufd-cuse serve --selftest`, as a kernel built with CONFIG_IOMMUFD_TEST).

The mock IOMMU is one per daemon and every mock device sits behind it, each in
a group of its own. Its paging domains have the kernel mock's geometry:

  - MOCK_IOMMUPT_DEFAULT: 2 KiB pages only, aperture [MOCK_APERTURE_START,
    MOCK_APERTURE_LAST];
  - MOCK_IOMMUPT_HUGE (HWPT_ALLOC with IOMMU_HWPT_DATA_SELFTEST): pgsize bitmap
    MOCK_HUGE_PAGE_SIZE | PAGE_SIZE, the whole IOVA space. The native table
    keeps a 2 KiB granule underneath (its level sizes are 2 KiB, 1 MiB, ...,
    so 1 MiB leaves exist), while iommufd sees a 4 KiB granule as in mainline.

A file handed back to the caller (CREATE_ACCESS, DMABUF_GET) cannot be created
by a FUSE server: both work with the companion library in the caller
(tools/iommufd_selftest_preload.c, which turns a daemon-issued token into an open
of the daemon's access or dma-buf node) and are EOPNOTSUPP, logged, without it. docs/selftest.md lists every op, what it does here and where it differs.

The package follows selftest.c's sections: the mock IOMMU (mock.py), the selftest
object and the call every op takes (stdev.py), the domain inspection ops
(md_check.py), the accesses (access.py; the access object itself is the core's,
iommufd/access.py, as iommufd_access_* are device.c's), the PASID ops (pasid.py),
the dma-buf exporter (dmabuf.py), the other ops (ops.py); the command table is here.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

from ... import uapi
from ...errors import Errno
from ..object import Ucmd
from .access import (
    ACCESS_CLAIM,
    ACCESS_NODE,
    ACCESS_TOKEN_BASE,
    AccessFile,
    op_access_pages,
    op_access_replace_ioas,
    op_access_rw,
    op_create_access,
    op_destroy_access_pages,
)
from .dmabuf import DMABUF_NODE, DmabufFile, op_dmabuf_get, op_dmabuf_revoke
from .md_check import op_dirty, op_md_check_iotlb, op_md_check_map, op_md_check_refs
from .mock import MockDomain, MockNestedDomain
from .ops import (
    op_add_reserved,
    op_dev_check_cache,
    op_mock_domain,
    op_mock_domain_replace,
    op_set_temp_memory_limit,
    op_trigger_iopf,
    op_trigger_vevent,
)
from .pasid import op_pasid_attach, op_pasid_check_hwpt, op_pasid_detach, op_pasid_replace
from .stdev import SelftestCall

# What the daemon and the tests use from the test mode.
__all__ = [
    "ACCESS_CLAIM",
    "ACCESS_NODE",
    "ACCESS_TOKEN_BASE",
    "AccessFile",
    "DMABUF_NODE",
    "DmabufFile",
    "MockDomain",
    "MockNestedDomain",
    "iommufd_test",
]


def iommufd_test(ucmd: Ucmd) -> int | Awaitable[int]:
    """IOMMU_TEST_CMD: dispatch on op; an unknown op is EOPNOTSUPP. An op that
    answers at once is answered without a task of its own (ACCESS_RW is called by
    the thousand)."""
    cmd = ucmd.cmd
    handler = _OPS.get(cmd.op)
    struct = uapi.IOMMU_TEST_OP_STRUCTS.get(cmd.op)
    if handler is None or struct is None:
        raise Errno(errno.EOPNOTSUPP)
    t = SelftestCall(ucmd, cmd.op, cmd.id, struct.unpack(cmd.data), struct)
    r = handler(t)
    if isinstance(r, Awaitable):
        return _finish(r)
    return r or 0


async def _finish(r: Awaitable[int | None]) -> int:
    return await r or 0


_OPS: dict[int, Callable[[SelftestCall], int | Awaitable[int]]] = {
    uapi.IOMMU_TEST_OP_ADD_RESERVED: op_add_reserved,
    uapi.IOMMU_TEST_OP_MOCK_DOMAIN: op_mock_domain,
    uapi.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS: op_mock_domain,
    uapi.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: op_mock_domain_replace,
    uapi.IOMMU_TEST_OP_MD_CHECK_MAP: op_md_check_map,
    uapi.IOMMU_TEST_OP_MD_CHECK_REFS: op_md_check_refs,
    uapi.IOMMU_TEST_OP_MD_CHECK_IOTLB: op_md_check_iotlb,
    uapi.IOMMU_TEST_OP_DEV_CHECK_CACHE: op_dev_check_cache,
    uapi.IOMMU_TEST_OP_CREATE_ACCESS: op_create_access,
    uapi.IOMMU_TEST_OP_ACCESS_REPLACE_IOAS: op_access_replace_ioas,
    uapi.IOMMU_TEST_OP_ACCESS_PAGES: op_access_pages,
    uapi.IOMMU_TEST_OP_ACCESS_RW: op_access_rw,
    uapi.IOMMU_TEST_OP_DESTROY_ACCESS_PAGES: op_destroy_access_pages,
    uapi.IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT: op_set_temp_memory_limit,
    uapi.IOMMU_TEST_OP_DIRTY: op_dirty,
    uapi.IOMMU_TEST_OP_TRIGGER_IOPF: op_trigger_iopf,
    uapi.IOMMU_TEST_OP_TRIGGER_VEVENT: op_trigger_vevent,
    uapi.IOMMU_TEST_OP_DMABUF_GET: op_dmabuf_get,
    uapi.IOMMU_TEST_OP_DMABUF_REVOKE: op_dmabuf_revoke,
    uapi.IOMMU_TEST_OP_PASID_ATTACH: op_pasid_attach,
    uapi.IOMMU_TEST_OP_PASID_REPLACE: op_pasid_replace,
    uapi.IOMMU_TEST_OP_PASID_DETACH: op_pasid_detach,
    uapi.IOMMU_TEST_OP_PASID_CHECK_HWPT: op_pasid_check_hwpt,
}
