"""Build: the Python packages (see pyproject.toml) plus the pybind11 extension in csrc/.

The Triton kernels live in `kernels/nova_kernels/` and install as the package `nova_kernels`.
`kernels/` itself is a plain folder, never an importable package of ours: the PyPI package
`kernels` (which transformers imports) keeps its name for every `python -m ...` run from the
repository root (a folder without __init__.py loses to an installed regular package).
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

packages = find_packages(include=["nova_engine", "nova_engine.*"])
packages += find_packages(where="kernels", include=["nova_kernels", "nova_kernels.*"])

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
    package_dir={"nova_kernels": "kernels/nova_kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
