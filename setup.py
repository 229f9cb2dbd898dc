# setuptools needs setup.py only to run the cffi build of native/ during `pip install`.
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
