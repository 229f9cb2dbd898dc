# setuptools needs setup.py only for the C parts built during `pip install`:
# the cffi extension of native/, and the LD_PRELOAD companion of the test mode
# (a plain shared library shipped inside the package; `iommufd-cuse companion`
# prints its path).
from setuptools import Extension, setup

companion = Extension(
    "iommufd_cuse.libiommufd_selftest_preload",
    sources=["tools/iommufd_selftest_preload.c"],
    include_dirs=["include"],
    libraries=["dl"],
    extra_compile_args=["-O2", "-Wall"],
)

setup(cffi_modules=["native/build_native.py:ffibuilder"], ext_modules=[companion])
