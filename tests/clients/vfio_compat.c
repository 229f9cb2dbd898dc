/* A program written for the legacy VFIO type1 container API, as it runs on
 * /dev/vfio/vfio provided by iommufd: it selects its IOAS with IOMMU_VFIO_IOAS
 * (as cdev users do) and otherwise speaks only type1.
 *
 *   vfio_compat <container node> <type: 1 or 3>
 */
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "stepper.h"

#define SZ (1u << 20)

int main(int argc, char **argv)
{
	int fd = open(argc > 1 ? argv[1] : "/dev/vfio/vfio", O_RDWR);
	unsigned long type = argc > 2 ? strtoul(argv[2], NULL, 0) : 3;
	if (fd < 0)
		die("open");
	char *buf = mmap(NULL, 4 * SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED)
		die("mmap");

	step0("api_version", xres(ioctl(fd, VFIO_GET_API_VERSION)));
	step0("ext_type1", xres(ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU)));
	step0("ext_type1v2", xres(ioctl(fd, VFIO_CHECK_EXTENSION, 3)));
	step0("ext_unmap_all", xres(ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_UNMAP_ALL)));
	step0("ext_update_vaddr", xres(ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR)));
	step0("ext_spapr", xres(ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_IOMMU)));
	step0("ext_cc_no_ioas", xres(ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU)));
	step0("set_iommu_no_ioas", xres(ioctl(fd, VFIO_SET_IOMMU, type)));

	struct vfio_iommu_type1_dma_map map = { .argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)buf, .iova = 0x100000, .size = SZ };
	step0("map_before_ioas", xioctl(fd, VFIO_IOMMU_MAP_DMA, &map));

	/* Select the IOAS the container ioctls act on. */
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	step("ioas_alloc", xioctl(fd, IOMMU_IOAS_ALLOC, &alloc), "id=%u", alloc.out_ioas_id);
	struct iommu_vfio_ioas vi = { .size = sizeof(vi), .ioas_id = alloc.out_ioas_id, .op = IOMMU_VFIO_IOAS_SET };
	step0("vfio_ioas_set", xioctl(fd, IOMMU_VFIO_IOAS, &vi));
	vi.op = IOMMU_VFIO_IOAS_GET;
	vi.ioas_id = 0;
	step("vfio_ioas_get", xioctl(fd, IOMMU_VFIO_IOAS, &vi), "id=%u", vi.ioas_id);
	step0("ext_cc", xres(ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU)));
	step0("set_iommu_bad", xres(ioctl(fd, VFIO_SET_IOMMU, 7ul)));
	step0("set_iommu", xres(ioctl(fd, VFIO_SET_IOMMU, type)));

	/* GET_INFO: first with the bare struct, then with room for the chain. */
	struct vfio_iommu_type1_info info = { .argsz = sizeof(info) };
	struct res r = xioctl(fd, VFIO_IOMMU_GET_INFO, &info);
	step("get_info_small", r, "argsz=%u flags=%#x cap_offset=%u pgsizes=%#llx", info.argsz, info.flags,
	     info.cap_offset, (unsigned long long)info.iova_pgsizes);
	uint32_t need = info.argsz;
	char *ib = calloc(1, need);
	((struct vfio_iommu_type1_info *)ib)->argsz = need;
	r = xioctl(fd, VFIO_IOMMU_GET_INFO, ib);
	struct vfio_iommu_type1_info *full = (void *)ib;
	step("get_info", r, "argsz=%u flags=%#x cap_offset=%u", full->argsz, full->flags, full->cap_offset);
	for (uint32_t off = full->cap_offset; off; ) {
		struct vfio_info_cap_header *h = (void *)(ib + off);
		if (h->id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
			struct vfio_iommu_type1_info_cap_iova_range *c = (void *)h;
			for (uint32_t i = 0; i < c->nr_iovas; i++)
				printf("STEP cap_iova_%u rc=0 errno=0 start=%#llx end=%#llx\n", i,
				       (unsigned long long)c->iova_ranges[i].start, (unsigned long long)c->iova_ranges[i].end);
			step("cap_iova", xres(0), "at=%u version=%u nr=%u", off, h->version, c->nr_iovas);
		} else if (h->id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL) {
			struct vfio_iommu_type1_info_dma_avail *c = (void *)h;
			step("cap_dma_avail", xres(0), "at=%u version=%u avail=%u", off, h->version, c->avail);
		}
		off = h->next;
	}

	/* Map, see it through the IOAS ioctls, unmap. */
	step0("map", xioctl(fd, VFIO_IOMMU_MAP_DMA, &map));
	step0("map_overlap", xioctl(fd, VFIO_IOMMU_MAP_DMA, &map));
	map.iova = 0x400000;
	map.vaddr = (uintptr_t)buf + SZ;
	step0("map2", xioctl(fd, VFIO_IOMMU_MAP_DMA, &map));
	struct vfio_iommu_type1_dma_map bad = map;
	bad.flags |= VFIO_DMA_MAP_FLAG_VADDR;
	step0("map_flag_vaddr", xioctl(fd, VFIO_IOMMU_MAP_DMA, &bad));
	bad = map;
	bad.argsz = 8;
	step0("map_argsz", xioctl(fd, VFIO_IOMMU_MAP_DMA, &bad));

	struct iommu_iova_range ranges[4];
	struct iommu_ioas_iova_ranges rq = { .size = sizeof(rq), .ioas_id = alloc.out_ioas_id, .num_iovas = 4,
		.allowed_iovas = (uintptr_t)ranges };
	step("iova_ranges_via_ioas", xioctl(fd, IOMMU_IOAS_IOVA_RANGES, &rq), "n=%u", rq.num_iovas);
	/* IOAS_COPY from the compat IOAS proves the mappings are there. */
	struct iommu_ioas_alloc a2 = { .size = sizeof(a2) };
	xioctl(fd, IOMMU_IOAS_ALLOC, &a2);
	struct iommu_ioas_copy cp = { .size = sizeof(cp), .flags = IOMMU_IOAS_MAP_READABLE, .dst_ioas_id = a2.out_ioas_id,
		.src_ioas_id = alloc.out_ioas_id, .length = SZ, .src_iova = 0x100000 };
	step("copy_from_compat", xioctl(fd, IOMMU_IOAS_COPY, &cp), "dst_iova=%#llx", (unsigned long long)cp.dst_iova);
	struct iommu_destroy d = { .size = sizeof(d), .id = a2.out_ioas_id };
	xioctl(fd, IOMMU_DESTROY, &d);

	struct vfio_iommu_type1_dma_unmap um = { .argsz = sizeof(um), .iova = 0x100000, .size = 0x1000 };
	r = xioctl(fd, VFIO_IOMMU_UNMAP_DMA, &um);
	step("unmap_partial", r, "size=%#llx", (unsigned long long)um.size);
	um = (struct vfio_iommu_type1_dma_unmap){ .argsz = sizeof(um), .flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
		.iova = 0x400000, .size = SZ };
	step0("unmap_dirty_flag", xioctl(fd, VFIO_IOMMU_UNMAP_DMA, &um));
	um = (struct vfio_iommu_type1_dma_unmap){ .argsz = sizeof(um), .iova = 0x400000, .size = SZ };
	r = xioctl(fd, VFIO_IOMMU_UNMAP_DMA, &um);
	step("unmap", r, "size=%#llx", (unsigned long long)um.size);
	/* nothing mapped there any more: success, size 0 (IOAS_UNMAP would say ENOENT) */
	r = xioctl(fd, VFIO_IOMMU_UNMAP_DMA, &um);
	step("unmap_empty", r, "size=%#llx", (unsigned long long)um.size);
	struct iommu_ioas_unmap iu = { .size = sizeof(iu), .ioas_id = alloc.out_ioas_id, .iova = 0x400000, .length = SZ };
	step0("ioas_unmap_empty", xioctl(fd, IOMMU_IOAS_UNMAP, &iu));
	um = (struct vfio_iommu_type1_dma_unmap){ .argsz = sizeof(um), .flags = VFIO_DMA_UNMAP_FLAG_ALL, .iova = 1 };
	step0("unmap_all_with_iova", xioctl(fd, VFIO_IOMMU_UNMAP_DMA, &um));
	um = (struct vfio_iommu_type1_dma_unmap){ .argsz = sizeof(um), .flags = VFIO_DMA_UNMAP_FLAG_ALL };
	r = xioctl(fd, VFIO_IOMMU_UNMAP_DMA, &um);
	step("unmap_all", r, "size=%#llx", (unsigned long long)um.size);
	step0("dirty_pages", xres(ioctl(fd, VFIO_IOMMU_DIRTY_PAGES, &um)));

	vi.op = IOMMU_VFIO_IOAS_CLEAR;
	step0("vfio_ioas_clear", xioctl(fd, IOMMU_VFIO_IOAS, &vi));
	vi.op = IOMMU_VFIO_IOAS_GET;
	step0("vfio_ioas_get_cleared", xioctl(fd, IOMMU_VFIO_IOAS, &vi));
	vi.op = 9;
	step0("vfio_ioas_bad_op", xioctl(fd, IOMMU_VFIO_IOAS, &vi));
	vi.op = IOMMU_VFIO_IOAS_SET;
	vi.ioas_id = 77;
	step0("vfio_ioas_set_unknown", xioctl(fd, IOMMU_VFIO_IOAS, &vi));
	return 0;
}
