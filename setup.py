"""Build the CUDA extension kernels._epd_C where CUDA is present (and kernels._epd_jpeg where nvjpeg
is found too); everything else (metadata,
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
    from kernels.build import CXX_FLAGS, JPEG_SOURCES, NVCC_FLAGS, ROOT, nvjpeg_link_args, nvjpeg_paths, sources

    exts = [CUDAExtension(
        name="kernels._epd_C",
        sources=sources(),
        include_dirs=[str(ROOT)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )]
    nvjpeg = nvjpeg_paths()
    if nvjpeg is not None:  # the hardware JPEG decoder (kernels/jpeg), where nvjpeg is found
        include, lib, name = nvjpeg
        exts.append(CUDAExtension(
            name="kernels._epd_jpeg",
            sources=JPEG_SOURCES,
            include_dirs=[str(ROOT), str(include)],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=nvjpeg_link_args(lib, name),
        ))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
