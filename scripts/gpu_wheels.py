"""Wheels for `make test-gpu` on a bare GPU image without internet:  python scripts/gpu_wheels.py [--dest wheels]

`make gpu-wheels` runs this on a machine with internet; copy the repo with its wheels/ to the GPU machine, where
`make test-gpu` installs from them with `pip install --no-index --find-links wheels -r wheels/requirements.txt`.

The image is assumed to have PyTorch with its CUDA libraries, transformers, peft and accelerate. Downloaded:

* rlt's pinned dependencies (pyproject.toml) except torch, and the dev extra's pytest / pytest-timeout (to run the
  check). transformers, peft and accelerate come too (pure Python, ~13 MB): pip keeps the image's own copies when they
  satisfy the pins and installs these only when they do not.
* every dependency of those, except torch's CUDA runtime (nvidia-*, triton, cuda-*): resolved on this machine
  (`pip install --dry-run --ignore-installed --report`), then each downloaded with `--no-deps` as a wheel for the
  target: CPython 3.12, manylinux x86_64 up to glibc 2.28 (`--python-version`, `--max-glibc`). Platform wheels
  (tokenizers, pyarrow, numpy, wandb...) are downloaded for that platform, pure-Python ones as they are.
* a dependency published only as source (hydra's antlr4-python3-runtime 4.9.3) is built into a wheel here.
* setuptools and wheel (pyproject's build-system): `pip install --no-deps -e .` builds rlt offline from them.

* `--image-packages FILE` (the image's `pip list --format=freeze`): what the image already has is left out, unless
  it fails one of rlt's own pins (then the pinned version comes). A bare image with torch, transformers, numpy,
  pyarrow and pandas keeps the folder near 40 MB instead of ~175 MB (the device machine carries at most 64 MiB).

wheels/requirements.txt lists what `make test-gpu` asks pip for. The resolution evaluates environment markers on this
interpreter (Linux x86_64 required): another Python version than the target's is allowed with a warning, since the
stack's markers only differ below 3.11.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# On the image already, with its CUDA libraries: never downloaded (multi-GB).
IMAGE_ONLY = re.compile(r"^(torch|triton|pytorch-triton|nvidia-.*|cuda-.*)$")
DEV_PREFIX = "pytest"  # from the dev extra: pytest, pytest-timeout (not ruff)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if not match:
        raise SystemExit(f"gpu_wheels: cannot read the requirement {spec!r} in pyproject.toml")
    return canonical(match[1])


def requirements(pyproject: dict) -> tuple[list[str], list[str]]:
    """(what make test-gpu installs, what building rlt needs)."""
    project = pyproject["project"]
    deps = [d for d in project["dependencies"] if not IMAGE_ONLY.match(requirement_name(d))]
    dev = [d for d in project.get("optional-dependencies", {}).get("dev", [])
           if requirement_name(d).startswith(DEV_PREFIX)]
    return deps + dev, list(pyproject["build-system"]["requires"])


def platforms(max_glibc: str) -> list[str]:
    """pip's --platform values for manylinux x86_64 wheels up to glibc `max_glibc` (pip does not expand a
    manylinux_2_X tag to the older ones itself)."""
    major, minor = (int(x) for x in max_glibc.split("."))
    if major != 2 or minor < 17:
        raise SystemExit(f"gpu_wheels: --max-glibc {max_glibc}: expected 2.17 or newer")
    tags = [f"manylinux_2_{m}_x86_64" for m in range(minor, 16, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+ " + " ".join(cmd[2:])[:400] + (" ..." if len(" ".join(cmd[2:])) > 400 else ""), flush=True)
    subprocess.run(cmd, check=True)


def resolve(reqs: list[str]) -> list[dict]:
    """Every distribution pip would install for `reqs` on a machine without any (name, version, url)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *reqs)
        items = json.loads(report.read_text())["install"]
    return [{"name": canonical(i["metadata"]["name"]), "version": i["metadata"]["version"],
             "url": i["download_info"]["url"]} for i in items]


def image_packages(path: str | None) -> dict[str, str]:
    """{name: version} from a `pip list --format=freeze` / `pip freeze` file ("name==version" lines)."""
    if path is None:
        return {}
    found = {}
    for line in Path(path).read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and name and not name.startswith("#"):
            found[canonical(name)] = version.strip()
    return found


def left_to_the_image(resolved: list[dict], image: dict[str, str], pins: list[str]) -> set[str]:
    """Names of `resolved` the image already has at a version rlt's own requirements `pins` accept."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    specs = {canonical(r.name): r.specifier for r in map(Requirement, pins)}
    accepted = {name: specs.get(name, SpecifierSet()).contains(version, prereleases=True)
                for name, version in image.items()}
    return {d["name"] for d in resolved if accepted.get(d["name"], False)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(REPO / "wheels"), help="folder for the wheels (default: wheels/)")
    parser.add_argument("--python-version", default="3.12", help="the GPU image's Python (default 3.12)")
    parser.add_argument("--max-glibc", default="2.28", help="newest manylinux glibc the image runs (default 2.28)")
    parser.add_argument("--image-packages", metavar="FILE",
                        help="the image's `pip list --format=freeze`: what it has at an accepted version is left out")
    args = parser.parse_args()
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        print(f"gpu_wheels: run this on Linux x86_64 (this is {sys.platform} {platform.machine()}): the dependency "
              "resolution evaluates markers here", file=sys.stderr)
        return 2
    if here != args.python_version:
        print(f"gpu_wheels: resolving with Python {here} for a Python {args.python_version} image (markers are "
              "evaluated for this one)", file=sys.stderr)
    reqs, build = requirements(tomllib.loads((REPO / "pyproject.toml").read_text()))
    dest = Path(args.dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)

    resolved = [d for d in resolve(reqs + build) if not IMAGE_ONLY.match(d["name"])]
    on_image = left_to_the_image(resolved, image_packages(args.image_packages), reqs + build)
    resolved = [d for d in resolved if d["name"] not in on_image]
    if on_image:
        print(f"left to the image ({len(on_image)}): {', '.join(sorted(on_image))}")
    binary = [d for d in resolved if d["url"].endswith(".whl")]
    source = [d for d in resolved if not d["url"].endswith(".whl")]
    target = ["--python-version", args.python_version, "--implementation", "cp",
              "--abi", "cp" + args.python_version.replace(".", "")]
    for tag in platforms(args.max_glibc):
        target += ["--platform", tag]
    pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), *target,
        *(f"{d['name']}=={d['version']}" for d in binary))
    if source:  # published only as source: a wheel built here (pure Python ones run anywhere)
        pip("wheel", "--no-deps", "--wheel-dir", str(dest), *(f"{d['name']}=={d['version']}" for d in source))
    (dest / "requirements.txt").write_text(
        "# what `make test-gpu` installs from this folder (scripts/gpu_wheels.py; torch: the image's own)\n"
        + "\n".join(reqs) + "\n")

    files = sorted(dest.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    width = max(len(f.name) for f in files)
    for f in files:
        print(f"  {f.name:<{width}}  {f.stat().st_size / 1e6:7.2f} MB")
    built = f", {len(source)} built from source ({', '.join(d['name'] for d in source)})" if source else ""
    print(f"{len(files)} wheels, {total / 1e6:.1f} MB in {dest}{built}; torch and its CUDA runtime are the image's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
