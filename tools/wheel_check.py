"""Build semlens's wheel, check its contents, install it the way users do, and smoke-test the command line.

Run by ``make test`` (so by CI). Steps:

1. ``python -m build --wheel`` (the standard front end, with build isolation) into ``build/wheel-check/dist``.
2. The wheel's contents: every file under ``src/semlens`` (modules, templates, static files) is inside; no tests,
   benchmarks, caches or compiled files.
3. A fresh virtual environment; torch from this machine's local wheel (``--torch``, default the version pinned
   in ``requirements.txt``), then the wheel, with pip resolving only the dependencies the wheel *declares* (the
   newest releases within the declared ranges, nothing from ``requirements.txt``); ``pip check``.
4. The commands a newcomer runs first, from an empty directory, with progress bars forced on
   (``SEMLENS_PROGRESS=1``, so the terminal-only imports run too): ``--help``, ``data concepts`` (50 images),
   a 1-epoch ``train``, ``dissect``, ``explain``, ``feedback init`` and ``feedback add``.

Exit status 0 when all of it passes; otherwise the failing step's output and a non-zero status.
``--keep`` leaves the environment in place for a look; ``--reuse-venv`` skips step 3's fresh environment
when one exists (for iterating on the smoke commands only).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "semlens"
FORBIDDEN_PARTS = {"tests", "benchmarks", "__pycache__", ".pytest_cache", ".ruff_cache"}


class CheckFailed(RuntimeError):
    """One step of the wheel check failed; the message says which and why."""


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, step: str) -> str:
    """Run ``cmd``; return its combined output, or raise :class:`CheckFailed` with the output's tail."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise CheckFailed(f"{step} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    print(f"  ok  {step} ({took:.1f}s)", flush=True)
    return out


def build_wheel(dist: Path) -> Path:
    shutil.rmtree(dist, ignore_errors=True)
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)], step="build the wheel")
    wheels = sorted(dist.glob("semlens-*.whl"))
    if len(wheels) != 1:
        raise CheckFailed(f"expected one semlens wheel in {dist}, found {[w.name for w in wheels]}")
    return wheels[0]


def expected_files() -> set[str]:
    """Paths (relative to site-packages) that the wheel must hold: every file of the package's source tree
    (modules, templates, static files), caches aside."""
    return {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


def check_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(expected_files() - names)
    if missing:
        raise CheckFailed(f"the wheel lacks {len(missing)} file(s) of the package: {missing[:10]}")
    stray = sorted(n for n in names if FORBIDDEN_PARTS & set(Path(n).parts) or n.endswith((".pyc", ".pyo")))
    if stray:
        raise CheckFailed(f"the wheel holds files that do not belong to the package: {stray[:10]}")
    print(f"  ok  contents ({len(names)} files, every file of src/semlens present, no tests or caches)")


def pinned_torch() -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.lower().startswith("torch=="):
            return line.strip()
    raise CheckFailed("requirements.txt pins no torch version")


def make_venv(venv: Path, wheel: Path, torch_req: str, reuse: bool) -> Path:
    python = venv / "bin" / "python"
    if reuse and python.exists():
        run([str(python), "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)],
            step="reinstall the wheel into the existing environment")
        return python
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)], step="create a fresh virtual environment")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run([*pip, torch_req], step=f"install {torch_req} (the local CPU wheel)")
    run([*pip, str(wheel)], step="install the wheel, pip resolving its declared dependencies")
    run([str(python), "-m", "pip", "check"], step="pip check")
    return python


def best_concept(units_csv: Path, layer: str) -> str:
    """The concept of ``layer``'s unit with the highest IoU in a dissection table."""
    with units_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r["layer"] == layer]
    if not rows:
        raise CheckFailed(f"{units_csv} has no row of layer {layer}")
    return max(rows, key=lambda r: float(r["iou"]))["concept"]


def smoke(python: Path, work: Path) -> None:
    """The newcomer's first commands, run through the installed ``semlens`` from an empty directory."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    semlens = str(python.parent / "semlens")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env.update(SEMLENS_PROGRESS="1", OMP_NUM_THREADS="1", COLUMNS="200",
               PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}")

    def sl(*args: str, step: str) -> str:
        return run([semlens, *args], cwd=work, env=env, step=step)

    imported = run([str(python), "-c", "import semlens, sys; print(semlens.__file__)"], cwd=work, env=env,
                   step="import semlens")
    if str(ROOT / "src") in imported:
        raise CheckFailed(f"semlens was imported from the source tree, not the wheel: {imported.strip()}")
    sl("--help", step="semlens --help")
    sl("data", "concepts", "--out", "data", "--n", "50", "--size", "32", "--workers", "1",
       step="semlens data concepts (50 images)")
    sl("train", "--data", "data", "--out", "run", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
       step="semlens train (1 epoch)")
    weights = "run/model.safetensors"
    sl("dissect", "--model", "alexnet-like", "--weights", weights, "--data", "data", "--layers", "all-conv",
       "--out", "dissect", "--workers", "1", "--device", "cpu", step="semlens dissect")
    sl("explain", "--model", "alexnet-like", "--weights", weights, "--input", "data/images/000000.png",
       "--out", "explain", "--device", "cpu", step="semlens explain")
    if not (work / "explain" / "000000.png").exists():
        raise CheckFailed("semlens explain wrote no heatmap")
    sl("feedback", "init", "--model", "alexnet-like", "--weights", weights, "--data", "data",
       "--names", "dissect/units.csv", "--layer", "features.conv5", "-p", "project", step="semlens feedback init")
    concept = best_concept(work / "dissect" / "units.csv", "features.conv5")
    sl("feedback", "add", "000001", "--missing", concept, "--text", "wheel smoke test", "-p", "project",
       step=f"semlens feedback add (--missing {concept})")
    listing = sl("feedback", "list", "-p", "project", step="semlens feedback list")
    if "000001" not in listing or "open" not in listing:
        raise CheckFailed(f"feedback list does not show the remark just added:\n{listing}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "build" / "wheel-check", help="working directory")
    parser.add_argument("--torch", default=None, help="torch requirement (default: requirements.txt's pin)")
    parser.add_argument("--keep", action="store_true", help="keep the environment and outputs afterwards")
    parser.add_argument("--reuse-venv", action="store_true", help="reuse an existing environment")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print("wheel check:", flush=True)
    try:
        wheel = build_wheel(args.dir / "dist")
        check_contents(wheel)
        python = make_venv(args.dir / "venv", wheel, args.torch or pinned_torch(), args.reuse_venv)
        smoke(python, args.dir / "smoke")
    except CheckFailed as err:
        print(f"wheel check FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and not args.reuse_venv:
            shutil.rmtree(args.dir / "smoke", ignore_errors=True)
    print(f"wheel check passed in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
