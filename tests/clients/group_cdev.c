/* A device bound through its cdev keeps its group from being opened, and the
 * group opens again once that cdev file is closed.
 *
 *   group_cdev <dev dir> <group> <cdev index>
 */
#include <fcntl.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "stepper.h"

int main(int argc, char **argv)
{
	char group[4096], cdev[4096], iommu[4096];

	if (argc < 4)
		return 2;
	snprintf(group, sizeof(group), "%s/vfio/%s", argv[1], argv[2]);
	snprintf(cdev, sizeof(cdev), "%s/vfio/devices/vfio%s", argv[1], argv[3]);
	snprintf(iommu, sizeof(iommu), "%s/iommu", argv[1]);
	int i = open(iommu, O_RDWR), d = open(cdev, O_RDWR);
	if (i < 0 || d < 0)
		die("open");
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = i };
	step0("bind_cdev", xioctl(d, VFIO_DEVICE_BIND_IOMMUFD, &bind));
	step0("open_group_cdev_bound", xres(open(group, O_RDWR)));
	close(d);
	int g = -1;
	for (int n = 0; n < 500 && g < 0; n++) {
		g = open(group, O_RDWR);
		if (g < 0)
			usleep(2000);
	}
	step0("open_group_after_close", xres(g));
	return 0;
}
