"""Build the CUDA extension epd_kernels._epd_C where CUDA is present; everything else (metadata,
dependencies, packages, entry points) is in pyproject.toml.

    pip install -e .          # CPU: pure Python (torch backend); GPU: + the extension
    EPD_SKIP_CUDA=1 pip wheel --no-deps --no-build-isolation .   # pure-Python wheel
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).parent))


def extensions() -> tuple[list, dict]:
    if os.environ.get("EPD_SKIP_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or not torch.cuda.is_available() and os.environ.get("EPD_FORCE_CUDA") != "1":
        return [], {}
    from epd_kernels.build import CXX_FLAGS, NVCC_FLAGS, ROOT, sources

    ext = CUDAExtension(
        name="epd_kernels._epd_C",
        sources=sources(),
        include_dirs=[str(ROOT)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
