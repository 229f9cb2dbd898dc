"""Device DMA copy cost (native/dma.c) against memcpy, measured in the same run.

icuse_dma_copy of 64 MiB through two I/O page tables (translate, pin checks,
locks, chunking), from
  MEM:  a memfd mapped in this process (what IOAS_MAP_FILE / shared mappings give)
  PROC: private anonymous memory of another process, via its /proc/<pid>/mem
into MEM (and PROC into PROC of the same process), compared with ffi.memmove of
the same 64 MiB between two buffers of this process. Ratio = memcpy time / dma time (1.0: as fast as memcpy).

Run: .venv/bin/python bench/dma_native.py
"""

import ctypes
import mmap
import os
import statistics
import subprocess
import sys
import time

from iommufd_cuse._native import ffi, lib

SIZE = 64 << 20
PAGE = 4096
K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
RW = lib.ICUSE_PROT_READ | lib.ICUSE_PROT_WRITE
RUNS = 9
SRC_IOVA, DST_IOVA, PROC_IOVA, PROC2_IOVA = G1, 2 * G1, 4 * G1, 8 * G1

CHILD = r"""
import mmap, sys, ctypes
size = int(sys.argv[1])
m = mmap.mmap(-1, 2 * size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = bytes([0x5a]) * (2 * size)
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


def memfd(size):
    fd = os.memfd_create("bench")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    m[:] = bytes([0xA5]) * size  # fault every page in before timing
    return m


def addr_of(m):
    return int(ffi.cast("uintptr_t", ffi.from_buffer(m)))


def timed(fn):
    ts = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def measure(st, spt, dpt, src_m, dst_m, child_fd, child_addr):
    """Times of memcpy, MEM->MEM, raw pread of /proc/<pid>/mem, PROC->MEM and
    MEM->PROC copies of SIZE."""
    src_p, dst_p = ffi.from_buffer(src_m), ffi.from_buffer(dst_m)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
    libc.pread.restype = ctypes.c_ssize_t
    dst_addr = addr_of(dst_m)

    def pread():
        assert libc.pread(child_fd, dst_addr, SIZE, child_addr) == SIZE

    fault = ffi.new("uint64_t *")
    is_dst = ffi.new("int *")

    def memcpy():
        ffi.memmove(dst_p, src_p, SIZE)

    def copy(s_pt, s_iova, d_pt, d_iova):
        rc = lib.icuse_dma_copy(st, s_pt, s_iova, d_pt, d_iova, SIZE, fault, is_dst)
        assert rc == 0, rc

    # Interleave baseline and subject so both see the same machine state.
    base = timed(memcpy)
    mem = timed(lambda: copy(spt, SRC_IOVA, dpt, DST_IOVA))
    base2 = timed(memcpy)
    raw = timed(pread)
    proc = timed(lambda: copy(spt, PROC_IOVA, dpt, DST_IOVA))
    to_proc = timed(lambda: copy(dpt, DST_IOVA, spt, PROC_IOVA))
    proc_proc = timed(lambda: copy(spt, PROC_IOVA, dpt, PROC2_IOVA))
    return min(base, base2), mem, raw, proc, to_proc, proc_proc


def main():
    st = lib.icuse_store_new()
    npages = SIZE // PAGE
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(SIZE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child_addr = int(child.stdout.readline())
    child_fd = os.open(f"/proc/{child.pid}/mem", os.O_RDWR)
    src_m, dst_m = memfd(SIZE), memfd(SIZE)
    pa = ffi.new("uint64_t *")
    results = []
    try:
        for leaf, bitmap in (("2 MiB", K4 | M2), ("4 KiB", K4)):
            spt = lib.icuse_pt_alloc(12, bitmap, 48)
            dpt = lib.icuse_pt_alloc(12, bitmap, 48)
            ids = []
            for pt, iova, kind, fd, addr in (
                (spt, SRC_IOVA, lib.ICUSE_BACKING_MEM, -1, addr_of(src_m)),
                (spt, PROC_IOVA, lib.ICUSE_BACKING_PROC, child_fd, child_addr),
                (dpt, DST_IOVA, lib.ICUSE_BACKING_MEM, -1, addr_of(dst_m)),
                (dpt, PROC2_IOVA, lib.ICUSE_BACKING_PROC, child_fd, child_addr + SIZE),
            ):
                pid = lib.icuse_pages_new(st, npages, iova, pa)
                assert lib.icuse_pages_set_backing(st, pid, 0, npages, kind, fd, addr) == 0
                assert lib.icuse_pages_pin(st, pid, 0, npages) == npages
                assert lib.icuse_pt_map(pt, iova, pa[0], SIZE, RW) == 0
                ids.append(pid)

            times = measure(st, spt, dpt, src_m, dst_m, child_fd, child_addr)
            assert dst_m[:16] == bytes([0x5A]) * 16  # the last copy into MEM came from the child
            results.append((leaf, *times))
            for pid in ids:
                lib.icuse_pages_unpin(st, pid, 0, npages)
                lib.icuse_pages_remove(st, pid)
            lib.icuse_pt_free(spt)
            lib.icuse_pt_free(dpt)
    finally:
        os.close(child_fd)
        child.kill()
        child.wait()
        lib.icuse_store_free(st)

    gbs = lambda t: SIZE / t / 1e9  # noqa: E731
    print(f"icuse_dma_copy of {SIZE >> 20} MiB vs memcpy (ffi.memmove) of the same size; median of {RUNS}")
    print("| leaves | copy | median ms | GB/s | ratio vs memcpy (median) | ratio (best) |")
    print("|---|---|---|---|---|---|")
    for leaf, base, mem, raw, proc, to_proc, proc_proc in results:
        for name, (med, mn) in (
            ("memcpy", base),
            ("MEM->MEM", mem),
            ("pread of /proc/<pid>/mem (raw, no DMA)", raw),
            ("PROC->MEM", proc),
            ("MEM->PROC", to_proc),
            ("PROC->PROC (same process)", proc_proc),
        ):
            print(f"| {leaf} | {name} | {med * 1e3:.2f} | {gbs(med):.2f} | {base[0] / med:.2f} | {base[1] / mn:.2f} |")


if __name__ == "__main__":
    main()
