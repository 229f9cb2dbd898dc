"""I/O page table costs (native/pagetable.c): time per entry for map, translate
and unmap of 1 GiB, and page-table memory per GiB mapped, by leaf size.

Run: .venv/bin/python bench/pagetable.py
"""

import ctypes
import time

from iommufd_cuse._native import ffi, lib

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
PA0 = 1 << 40
RW = lib.ICUSE_PROT_READ | lib.ICUSE_PROT_WRITE
REPEAT = 5


def stats(pt):
    s = ffi.new("struct icuse_pt_stats *")
    lib.icuse_pt_get_stats(pt, s)
    return s


def bench_leaf(leaf, bitmap, gib):
    """Map, translate, walk and unmap `gib` GiB made of `leaf`-sized leaves."""
    length = gib * G1
    nleaves = length // leaf
    segs = ffi.new("struct icuse_seg[1]")
    fault = ffi.new("uint64_t *")
    info = ffi.new("struct icuse_pte_info *")
    out = {}

    def run():
        pt = lib.icuse_pt_alloc(12, bitmap, 48)
        t0 = time.perf_counter()
        assert lib.icuse_pt_map(pt, G1, PA0, length, RW) == 0
        t1 = time.perf_counter()
        # One call over the whole range: the cost per leaf of the walk itself.
        assert lib.icuse_pt_translate(pt, G1, length, lib.ICUSE_PROT_WRITE, segs, 1, fault) == 1
        t2 = time.perf_counter()
        # Second translate: the A/D bits are already set (the usual case).
        assert lib.icuse_pt_translate(pt, G1, length, lib.ICUSE_PROT_WRITE, segs, 1, fault) == 1
        t3 = time.perf_counter()
        s = stats(pt)
        out["mem"] = s.tables * 4096 / gib
        assert s.leaves == nleaves
        n = 20000
        t4 = time.perf_counter()
        for i in range(n):
            lib.icuse_pt_walk(pt, G1 + (i * 7919 * K4) % length, info)
        t5 = time.perf_counter()
        assert lib.icuse_pt_unmap(pt, G1, length) == length
        t6 = time.perf_counter()
        assert stats(pt).tables == 1
        lib.icuse_pt_free(pt)
        times = (t1 - t0, t2 - t1, t3 - t2, (t5 - t4) / n, t6 - t5)
        out.setdefault("all", []).append(times)
        return 0

    for _ in range(REPEAT):
        run()
    cols = list(zip(*out["all"], strict=True))
    mapt, tr1, tr2, walk, unmap = (min(c) for c in cols)
    ns = 1e9 / nleaves
    return {
        "leaf": leaf,
        "leaves": nleaves,
        "map": mapt * ns,
        "translate (sets A/D)": tr1 * ns,
        "translate": tr2 * ns,
        "unmap": unmap * ns,
        "walk call": walk * 1e9,
        "mem": out["mem"],
    }


def fmt_size(n):
    for unit, s in (("GiB", G1), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= s:
            return f"{n / s:g} {unit}"
    return f"{n} B"


def main():
    rows = [
        bench_leaf(K4, K4, 1),
        bench_leaf(M2, K4 | M2, 64),
        bench_leaf(G1, K4 | M2 | G1, 1024),
    ]
    print("I/O page table, 4 KiB granule, 48-bit iova; best of", REPEAT)
    print("ns per leaf entry (one call over the whole range); walk = one cffi call for one iova")
    head = [
        "leaf",
        "leaves",
        "map",
        "translate (sets A/D)",
        "translate",
        "unmap",
        "walk call",
        "table mem / GiB",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(
            f"| {fmt_size(r['leaf'])} | {r['leaves']} | {r['map']:.1f} | {r['translate (sets A/D)']:.1f} "
            f"| {r['translate']:.1f} | {r['unmap']:.1f} | {r['walk call']:.0f} | {fmt_size(r['mem'])} |"
        )
    r = rows[0]
    print(
        f"\n1 GiB of 4 KiB leaves: map {r['map'] * r['leaves'] / 1e6:.2f} ms, "
        f"translate {r['translate'] * r['leaves'] / 1e6:.2f} ms, unmap {r['unmap'] * r['leaves'] / 1e6:.2f} ms"
    )
    # Split cost: unmapping one 4 KiB page from a 1 GiB leaf (4K|2M|1G).
    pt = lib.icuse_pt_alloc(12, K4 | M2 | G1, 48)
    n, t = 200, 0.0
    for i in range(n):
        lib.icuse_pt_map(pt, G1, PA0, G1, RW)
        t0 = time.perf_counter()
        lib.icuse_pt_unmap(pt, G1 + (i + 1) * M2 + K4, K4)
        t += time.perf_counter() - t0
        lib.icuse_pt_unmap(pt, G1, G1)
    lib.icuse_pt_free(pt)
    print(f"unmap of 4 KiB inside a 1 GiB leaf (two splits): {t / n * 1e6:.1f} us")
    daemon_rss_per_gib()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def daemon_rss_per_gib() -> None:
    """The daemon's resident memory for 1 GiB mapped into an IOAS with a domain
    attached: the daemon's own objects (area, pages, pins, page table), through the
    same code an IOMMU_IOAS_MAP takes. The mapped memory is a private anonymous
    region of this process, untouched: it is reached in place, never copied."""
    import mmap
    import os

    import trio

    from iommufd_cuse.iommu.domain import PagingDomain
    from iommufd_cuse.iommufd.io_pagetable import IoPagetable, PagesSlice
    from iommufd_cuse.iommufd.main import AccountMode
    from iommufd_cuse.iommufd.pages import UserPages
    from iommufd_cuse.system import System
    from iommufd_cuse.transport.caller import Caller

    async def run() -> None:
        system = System()
        iopt = IoPagetable()
        await iopt.add_domain(PagingDomain(K4 | M2 | G1, 0, (1 << 48) - 1, 48))
        region = mmap.mmap(-1, G1, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
        caller = Caller(os.getpid(), 0, 0)
        for leaf, iova in (("4 KiB leaves", K4 + (addr % K4)), ("2 MiB leaves", G1 + addr % M2)):
            before = _rss_kib()
            pages = UserPages(system, caller, AccountMode.USER, addr, G1, True)
            await iopt.map_pages([PagesSlice(pages, 0, G1)], G1, iova, 3)
            pages.put()
            after = _rss_kib()
            print(
                f"daemon resident memory per GiB mapped ({leaf}, pinned, in a domain): "
                f"{(after - before) / 1024:.2f} MiB"
            )
            iopt.unmap_all()

    trio.run(run)


if __name__ == "__main__":
    main()
