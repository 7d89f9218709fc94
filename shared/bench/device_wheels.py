"""The wheels a lent GPU machine needs to run `bench/gpu_bench.sh`, prepared here because it reaches no index.

The lent machines (`/work/.library/device`, BENCHMARKS.md "GPU") run Python 3.12 with PyTorch and a
scientific stack preinstalled, reach no package index, and take at most 64 MiB of files per call. This walks
the project's runtime dependencies through this environment's installed metadata, leaves out what the
machine's image already has (`bench/device-image.txt`), and downloads the versions installed here as
CPython 3.12 manylinux x86_64 wheels, in two parts that each fit one call:

- `stack`: everything the worker and the bench import (Celery, PostgreSQL and Redis from wheels, Milvus);
- `decoder`: the `gpu` extra, the hardware JPEG decoder (nvImageCodec with nvJPEG).

    .venv/bin/python -m shared.bench.device_wheels            # -> .device-wheels/{stack,decoder}/*.whl

`bench/device_run.sh` installs them on the machine and runs the bench; BENCHMARKS.md gives the two calls.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shared.bench.config import REPO

PYPROJECT = REPO / "pyproject.toml"
IMAGE_LIST = REPO / "bench" / "device-image.txt"
OUT_DIR = REPO / ".device-wheels"
# What the device tool sends per call, less room for the working tree (about 2 MB).
CALL_LIMIT_MB = 64 * 1024 * 1024 / 1e6
TREE_ALLOWANCE_MB = 6.0

# The machine: what markers are evaluated against and which wheels pip may pick.
PYTHON_VERSION = "3.12"
MARKER_ENV = {
    "python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.3", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
}
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 36)]


@dataclass
class Part:
    """One call's worth of wheels: distribution name -> the requirement to download (pinned where installed)."""

    name: str
    pins: dict[str, str] = field(default_factory=dict)


def image_packages(path: Path = IMAGE_LIST) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(line))
    return names


def _applies(req: Requirement, extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**MARKER_ENV, "extra": extra}) for extra in (*extras, ""))


def _pin(req: Requirement) -> str:
    """The version installed here, so the machine runs what the tests ran; the requirement itself when the
    distribution is not installed here (the `gpu` extra on a CPU machine)."""
    try:
        return f"{req.name}=={metadata.version(req.name)}"
    except metadata.PackageNotFoundError:
        return f"{req.name}{req.specifier}"


def project_requires(path: Path = PYPROJECT) -> list[str]:
    """The project's own requirements, read from pyproject.toml (the machine has the checkout, not the
    project installed), with the optional ones marked by their extra as installed metadata marks them."""
    project = tomllib.loads(path.read_text())["project"]
    optional = [f'{req}; extra == "{extra}"' for extra, reqs in project.get("optional-dependencies", {}).items()
                for req in reqs]
    return project["dependencies"] + optional


def walk(extras: tuple[str, ...], skip: set[str]) -> Iterator[tuple[str, Requirement]]:
    """(who needs it, requirement) for everything the project with `extras` needs on the machine, through
    this environment's metadata; names in `skip` are yielded but not walked into (the image's concern)."""
    seen: set[tuple[str, tuple[str, ...]]] = set()  # (distribution, extras) already walked
    todo: list[tuple[str | None, tuple[str, ...]]] = [(None, extras)]
    while todo:
        name, wanted = todo.pop()
        for text in project_requires() if name is None else _requires(name):
            req = Requirement(text)
            if not _applies(req, wanted):
                continue
            yield name or "the project", req
            key = canonicalize_name(req.name)
            if key in skip:
                continue
            wanted_there = tuple(sorted(req.extras))
            if (key, wanted_there) not in seen:
                seen.add((key, wanted_there))
                todo.append((req.name, wanted_there))


def closure(extras: tuple[str, ...], skip: set[str]) -> dict[str, str]:
    """Name -> pinned requirement of every distribution to send: the walk, less what the image holds."""
    needed: dict[str, str] = {}
    for _, req in walk(extras, skip):
        key = canonicalize_name(req.name)
        if key not in skip:
            needed.setdefault(key, _pin(req))
    return needed


def unmet(extras: tuple[str, ...] = ("gpu",)) -> list[str]:
    """What this environment fails to satisfy: run on the machine once the wheels are in, it names a wheel
    that did not install and a version the image holds that our dependencies do not accept (the image's
    own dependencies among themselves are not walked)."""
    problems = set()
    for parent, req in walk(extras, skip=image_packages()):
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.add(f"{req.name} (needed by {parent}): not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.add(f"{req.name} {have} does not satisfy {parent}'s {req.specifier}")
    return sorted(problems)


def decoder_versions(path: Path = PYPROJECT) -> list[str]:
    """torch's CUDA beside the versions of the decoder's wheels that installed: nvidia-nvjpeg is pinned to
    CUDA 13, not to the image's minor version, so a mismatch shows in the first call's output."""
    gpu_extra = tomllib.loads(path.read_text())["project"]["optional-dependencies"]["gpu"]
    lines = [_torch_cuda()]
    for name in (Requirement(text).name for text in gpu_extra):
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name}: not installed")
    return lines


def _torch_cuda() -> str:
    try:
        import torch
    except (ImportError, OSError) as exc:  # OSError: a CUDA library the build links is missing
        return f"torch does not import: {exc}"
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}"


def _requires(name: str) -> list[str]:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        # Not installed here: the `gpu` extra on a CPU machine. Its wheels (nvImageCodec, nvJPEG) declare no
        # dependencies, so there is nothing further to walk.
        return []


def parts(skip: set[str] | None = None) -> list[Part]:
    skip = image_packages() if skip is None else skip
    stack = closure((), skip)
    decoder = {k: v for k, v in closure(("gpu",), skip).items() if k not in stack}
    return [Part("stack", stack), Part("decoder", decoder)]


def download(part: Part, out: Path) -> list[Path]:
    """pip downloads the part's wheels for the machine, without their dependencies (the closure has them)."""
    target = out / part.name
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "--dest", str(target)]
    for platform in PLATFORMS + ["any"]:
        cmd += ["--platform", platform]
    subprocess.run(cmd + sorted(part.pins.values()), check=True)
    return sorted(target.glob("*.whl"))


def size_mb(paths: Iterable[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--list", action="store_true", help="print what each part holds and download nothing")
    ap.add_argument("--check", action="store_true",
                    help="on the machine, after installing: torch's CUDA and the decoder's versions, then the "
                         "requirements this environment does not meet")
    args = ap.parse_args(argv)
    if args.check:
        problems = unmet()
        print("\n".join(decoder_versions() + (problems or ["every requirement is met"])))
        return 1 if problems else 0
    over = []
    for part in parts():
        print(f"{part.name}: {' '.join(sorted(part.pins.values()))}")
        if args.list:
            continue
        wheels = download(part, args.out)
        mb = size_mb(wheels)
        print(f"{part.name}: {len(wheels)} wheels, {mb:.1f} MB in {args.out / part.name}")
        if mb > CALL_LIMIT_MB - TREE_ALLOWANCE_MB:
            over.append(f"{part.name} ({mb:.1f} MB)")
    if over:
        print(f"too large for one device call ({CALL_LIMIT_MB:.1f} MB with the working tree): {', '.join(over)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
