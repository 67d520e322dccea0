"""The installed package: a wheel and an editable install import from any directory, the wheel
ships the kernel sources (so epd_kernels.build works from site-packages) and the console entry
points, and scripts/ and parity/ stay in the checkout.

Both installs go into throwaway folders, from a copy of the checkout (no build/ left over from
earlier builds can leak into the wheel). The imports run with `python -S` plus the interpreter's
site-packages on sys.path but none of their .pth files, so the checkout's own editable install
(scripts/install.sh) cannot answer for the package under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine", "graphs", "ipc", "epd_kernels"}
KERNEL_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")
ENV = {**os.environ, "EPD_SKIP_CUDA": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
TIMEOUT_S = 300


def _checkout_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "-q", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _isolated_python(code: str, cwd: Path, first: list[str], site_dir: Path | None = None) -> str:
    """Run code with `python -S`: sys.path = `first` + stdlib + site-packages (no .pth files);
    with site_dir, it goes first and its .pth files run (an editable install's finder, whose
    module name is the same as the checkout's own editable install's)."""
    site_packages = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    first = [*first, str(site_dir)] if site_dir else first
    prelude = (f"import sys, site; sys.path[:0] = {[str(p) for p in first]!r}; sys.path += {site_packages!r}\n"
               + (f"site.addsitedir({str(site_dir)!r})\n" if site_dir else ""))
    proc = subprocess.run([sys.executable, "-S", "-c", prelude + code], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


IMPORTS = """
import engine, graphs, ipc, epd_kernels, engine.generate_cli, ipc.serve_cli
from engine import LLM
from epd_kernels.build import KERNELS, sources
for name in ("engine", "graphs", "ipc", "epd_kernels"):
    print(name, sys.modules[name].__file__)
import re
print("kernels_dir", KERNELS)
print("sources", len(sources()))
# every repo-rooted include of every source resolves beside the installed package (a compile would find it)
includes = {m for f in KERNELS.rglob("*") if f.suffix in (".cu", ".cuh", ".cpp", ".h")
            for m in re.findall(r'#include "(epd_kernels/[^"]+)"', f.read_text())}
print("unresolved", ",".join(sorted(i for i in includes if not (KERNELS.parent / i).is_file())) or "-")
print("includes", len(includes))
"""


def _parse(out: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("checkout")
    for f in _checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    return src


@pytest.fixture(scope="module")
def wheel(source_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source_copy), cwd=source_copy)
    (found,) = dist.glob("epd_engine-*.whl")
    return found


def _kernel_sources(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / "epd_kernels").rglob("*") if p.suffix in KERNEL_SUFFIXES}


def test_top_level_names_are_ours_alone() -> None:
    """No installed distribution but ours ships a top-level module of ours, and no requirement of
    transformers is named like one: transformers 5.25 requires HF's `kernels`, which our own kernel
    package shadowed (from the checkout) or overwrote (in site-packages) while it was called that."""
    from importlib import metadata

    from packaging.requirements import Requirement

    owners = metadata.packages_distributions()
    ours = {"epd-engine", "epd_engine"}
    for name in PACKAGES:
        others = set(owners.get(name, [])) - ours
        assert not others, f"top-level package {name!r} is also shipped by {sorted(others)}"
    wanted = {Requirement(r).name.replace("-", "_").lower() for r in metadata.requires("transformers") or []}
    assert not PACKAGES & wanted, f"transformers requires {sorted(PACKAGES & wanted)}, named like our packages"


def test_wheel_contents(wheel: Path, source_copy: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == PACKAGES, f"top-level entries {sorted(top)}; only {sorted(PACKAGES)} are installed"
    wanted = _kernel_sources(source_copy)
    assert len(wanted) > 40 and "epd_kernels/attn_varlen/decode.cu" in wanted and "epd_kernels/common.cuh" in wanted
    missing = wanted - names
    assert not missing, f"kernel sources not in the wheel: {sorted(missing)[:5]}"
    dist_info = next(n.split("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "epd-generate = engine.generate_cli:console_main" in entry_points, entry_points
    assert "epd-serve = ipc.serve_cli:console_main" in entry_points, entry_points
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Requires-Dist: transformers<6,>=5.17" in metadata, metadata
    assert 'Requires-Dist: pytest; extra == "test"' in metadata


def test_wheel_installs_and_imports_elsewhere(wheel: Path, source_copy: Path, tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=elsewhere)
    assert not (target / "scripts").exists() and not (target / "parity").exists()
    found = _parse(_isolated_python(IMPORTS, elsewhere, [str(target)]))
    for name in PACKAGES:
        assert Path(found[name]).is_relative_to(target), (name, found[name])
    assert Path(found["kernels_dir"]) == target / "epd_kernels"
    assert int(found["sources"]) == len([s for s in _kernel_sources(source_copy) if s.endswith((".cu", ".cpp"))])
    assert found["unresolved"] == "-" and int(found["includes"]) > 10, found
    # the console script runs the installed driver (PYTHONPATH: the --target folder is no site dir)
    proc = subprocess.run([str(target / "bin" / "epd-generate"), "--help"], cwd=elsewhere, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env={**ENV, "PYTHONPATH": str(target)})
    assert proc.returncode == 0 and "--model" in proc.stdout and "(default: 64)" in proc.stdout, proc.stderr


def test_editable_install_imports_elsewhere(source_copy: Path, tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _pip("install", "--no-deps", "--no-build-isolation", "--target", str(target), "-e", str(source_copy),
         cwd=elsewhere)
    found = _parse(_isolated_python(IMPORTS, elsewhere, [], site_dir=target))
    for name in PACKAGES:
        assert Path(found[name]).is_relative_to(source_copy), (name, found[name])
