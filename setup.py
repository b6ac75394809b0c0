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
            "csrc/attention.cpp",
            "csrc/attention_bindings.cpp",
        ],
        cxx_std=17,
        # -fopenmp: attention.cpp runs on torch's OpenMP team (libgomp.so.1, one per process);
        # -ffp-contract=fast: a * b + c as one FMA (ISO -std=c++17 turns it off).
        # attention.cpp compiles its kernels three times (x86-64-v4, x86-64-v3, the portable
        # baseline) and picks one at run time; -Wno-psabi: the baseline's 32-byte vectors.
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"],
        extra_link_args=["-fopenmp"],
    ),
]

setup(
    packages=packages,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
