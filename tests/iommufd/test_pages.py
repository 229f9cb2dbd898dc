"""The mappings a pin looks at (iommufd/pages.py): PROCMAP_QUERY one by one gives
what /proc/<pid>/maps says, for the range asked only."""

import mmap
import os

from iommufd_cuse.iommufd import pages


def test_maps_in_is_the_part_of_maps_in_the_range(monkeypatch):
    keep = [mmap.mmap(-1, 3 * 4096) for _ in range(3)]  # a few more mappings
    d = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY)
    try:
        every = [v for v in pages.read_maps(d) if v.start < pages.USER_VA_END]
        assert pages.maps_in(d, 0, pages.USER_VA_END) == every
        lo, hi = every[3].start + 1, every[6].end - 1
        want = every[3:7]
        assert pages.maps_in(d, lo, hi) == want
        monkeypatch.setattr(pages, "_procmap_query_works", False)  # kernels before 6.11
        assert pages.maps_in(d, lo, hi) == want
    finally:
        os.close(d)
        for m in keep:
            m.close()
