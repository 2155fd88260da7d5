"""Build of the optional compiled kernel; everything else is in pyproject.toml.

Without a C compiler the build of the extension fails quietly and
psmi_dask runs the same numerics in numpy, with the same results, slower.
"""

from setuptools import Extension, setup

kernel = Extension(
    "psmi_dask._kernel",
    sources=["psmi_dask/_kernel.c"],
    # No fused multiply-add and no reordering: the kernel must give the
    # numpy fallback's bits. Not trapping lets comparisons be vectorised.
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math"],
    optional=True,
)

setup(ext_modules=[kernel])
