"""Install the engine; build the CUDA extension kernels._epd_C where CUDA is present.

    pip install -e .          # CPU: pure Python (torch backend); GPU: + the extension
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

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
    from kernels.build import CXX_FLAGS, NVCC_FLAGS, ROOT, sources

    ext = CUDAExtension(
        name="kernels._epd_C",
        sources=sources(),
        include_dirs=[str(ROOT)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(
    name="epd-engine",
    version="0.1.0",
    description="EPD-disaggregated serving engine for LLaVA-style multimodal LLMs",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "scripts", "parity"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors", "transformers>=4.45", "numpy", "pillow", "multiprocess",
                      "pybind11", "ninja"],
    extras_require={"test": ["pytest", "ruff"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
