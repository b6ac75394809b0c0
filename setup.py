"""Build: the Python packages (see pyproject.toml) plus the pybind11 extension in csrc/.

`kernels/` is installed as the package `nova_kernels` (never as a top-level `kernels`,
a PyPI name that transformers probes for).
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

packages = find_packages(include=["nova_engine", "nova_engine.*"])
packages += ["nova_kernels", "nova_kernels.ops"]

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
    package_dir={"nova_engine": "nova_engine", "nova_kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
