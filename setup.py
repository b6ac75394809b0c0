"""Build: the Python packages (see pyproject.toml) plus the pybind11 extension in csrc/.

The Triton kernels live in `nova_kernels/`. The folder is named after the package on purpose:
a folder named `kernels/` at the repository root would shadow the PyPI package `kernels`,
which transformers imports, for every `python -m ...` run from the root.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

packages = find_packages(include=["nova_engine", "nova_engine.*"])
packages += find_packages(include=["nova_kernels", "nova_kernels.*"])

ext_modules = [
    Pybind11Extension(
        "nova_engine._C",
        sources=[
            "csrc/bindings.cpp",
            "csrc/packer.cpp",
            "csrc/decontam.cpp",
            "csrc/decontam_bindings.cpp",
        ],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    packages=packages,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
