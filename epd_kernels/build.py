"""Build settings for the CUDA extension `epd_kernels._epd_C`, shared by setup.py, the JIT path
and the compile check.

    python -m epd_kernels.build            # JIT-build (ninja, incremental) and copy the .so into epd_kernels/
    python -m epd_kernels.build --check    # compile every source with nvcc, no link (CI; no GPU needed)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KERNELS = Path(__file__).resolve().parent  # this package: its .cu/.cpp/.cuh/.h ship with it as package data
ROOT = KERNELS.parent  # includes are "epd_kernels/..."-rooted: the checkout, or site-packages once installed
ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills", *ARCH_FLAGS]
CXX_FLAGS = ["-O3"]


def sources() -> list[str]:
    """binding.cpp plus every family's .cu and .cpp files, relative to ROOT."""
    if not (KERNELS / "binding.cpp").is_file():
        raise FileNotFoundError(f"kernel sources not found under {KERNELS} (an install without package data?)")
    files = sorted(KERNELS.glob("*/*.cu")) + sorted(KERNELS.glob("*/*.cpp")) + [KERNELS / "binding.cpp"]
    return [str(f.relative_to(ROOT)) for f in files]


def build_dir() -> Path:
    """Where the JIT build keeps its objects: build/jit in a checkout; a user cache dir for an
    installed package (site-packages may be read-only, and is no place for build trees)."""
    if (ROOT / "pyproject.toml").is_file():
        return ROOT / "build" / "jit"
    return Path(os.environ.get("EPD_CACHE_DIR") or Path.home() / ".cache" / "epd-engine") / "jit"


def jit_build(verbose: bool = False) -> Path:
    """Build with torch's JIT loader (ninja, parallel, incremental); copy the .so into kernels/."""
    from torch.utils.cpp_extension import load

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    build = build_dir()
    links = build / "src"
    links.mkdir(parents=True, exist_ok=True)
    # torch names objects by file basename: link each source as <family>_<name> so that the
    # families' ops.cpp files do not collide (all includes are repo-rooted, so links compile).
    srcs = []
    for src in sources():
        link = links / src.replace("epd_kernels/", "").replace("/", "_")
        if not link.exists():
            link.symlink_to(ROOT / src)
        srcs.append(str(link))
    module = load(
        name="_epd_C",
        sources=srcs,
        extra_include_paths=[str(ROOT)],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=str(build),
        verbose=verbose,
    )
    target = KERNELS / Path(module.__file__).name
    shutil.copy2(module.__file__, target)
    return target


def compile_check(jobs: int = 2) -> int:
    """nvcc -c every source against torch's headers, without linking. Returns the failure count."""
    import torch

    torch_dir = Path(torch.__file__).parent
    shim = Path(tempfile.mkdtemp()) / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    # CPU wheels of torch lack this generated header; its content only matters when linking.
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(shim.parents[2]), str(ROOT), str(torch_dir / "include"),
                str(torch_dir / "include" / "torch" / "csrc" / "api" / "include"), sysconfig.get_paths()["include"]]
    inc = [f"-I{i}" for i in includes]
    import pybind11

    inc.append(f"-I{pybind11.get_include()}")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"

    cuda_inc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"

    def one(src: str) -> tuple[str, int, str]:
        out = Path(tempfile.mkdtemp()) / "o.o"
        common = [str(ROOT / src), "-o", str(out), "-std=c++17", abi, "-DTORCH_EXTENSION_NAME=_epd_C", *inc]
        if src.endswith(".cu"):
            cmd = ["nvcc", "-c", *common, *NVCC_FLAGS, "-Xcompiler", "-w"]
        else:  # .cpp files go to the host compiler, as in the real build
            cmd = ["c++", "-c", "-fsyntax-only", *common, f"-I{cuda_inc}", "-w"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return src, proc.returncode, proc.stderr

    failures = 0
    with ThreadPoolExecutor(jobs) as pool:
        for src, rc, err in pool.map(one, sources()):
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {src}", flush=True)
            if rc:
                failures += 1
                print(err[-4000:], file=sys.stderr)
    return failures


def main(argv: list[str] | None = None) -> int:
    # Plain argparse: epd_kernels/ is the bottom layer and imports nothing of engine/ (tests/test_layers.py).
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--check", action="store_true", help="compile-check only (no GPU, no link)")
    p.add_argument("--jobs", type=int, default=2, help="parallel compiles for --check")
    p.add_argument("--verbose", action="store_true", help="show the JIT build's compiler commands")
    args = p.parse_args(argv)
    try:
        if args.jobs < 1:
            raise ValueError(f"--jobs = {args.jobs}; must be >= 1")
        sources()  # the sources exist (a clear error for an install without them)
        if args.check and shutil.which("nvcc") is None:
            raise ValueError("--check needs nvcc on PATH (the CUDA toolkit)")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        return 1 if compile_check(args.jobs) else 0
    print(jit_build(args.verbose))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
