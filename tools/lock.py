"""`make lock`: regenerate every hashed lock under requirements/ from pyproject.toml, then prove
each one installs from wheels alone on every supported CPython.

One universal lock per install (uv's --universal: markers where a version differs, e.g. a
package that dropped 3.11), not one lock per Python version: the same pins on 3.11, 3.12 and
3.13, the paths every tool and doc already names, and a third of the files to review. Universal
resolution does not look at wheel tags, so the check step resolves each lock again with
--only-binary for each version on the target platform and fails naming the lock and the version.

Standard library only: it runs on whatever interpreter `make` found, before any venv exists.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
# The platform the project ships for (CI, the Docker images); universal locks also carry the
# hashes of every other platform's wheels, but only this one is checked.
PLATFORM = "x86_64-manylinux_2_28"
# Never a download address or a registry host name in a committed file (pip's config may add one).
FORBIDDEN = ("://", "--index-url", "--extra-index-url", "--find-links", "--trusted-host")


@dataclass(frozen=True)
class Lock:
    """One lock file: what it is compiled from (pyproject extras or a .in file)."""

    name: str
    extras: tuple[str, ...] = ()
    source: str = "pyproject.toml"
    # Pinned to dev.txt's versions wherever they share a package: what `make test` tests is what
    # `make serve`, the wheel path and the images install.
    constrained: bool = True

    @property
    def path(self) -> str:
        return f"requirements/{self.name}.txt"


DEV = Lock("dev", ("cpu", "export", "dev"), constrained=False)
LOCKS = (
    DEV,
    # The serving installs (`make serve`, the wheel path, the images): every serving extra,
    # never TensorFlow. serve: onnxruntime (CPU); gpu: onnxruntime-gpu, never beside onnxruntime.
    Lock("serve", ("cpu", "grpc", "slides")),
    Lock("gpu", ("gpu", "grpc", "slides")),
    Lock("test", ("cpu", "dev")),  # the other-version matrix of `make test`: dev without TensorFlow
    Lock("build", source="requirements/build.in"),  # setuptools + build, for --no-build-isolation
)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)


def compile_lock(uv: str, lock: Lock, floor: str, extra_args: list[str]) -> str | None:
    argv = [uv, "pip", "compile", lock.source, "--universal", "--python-version", floor, "--generate-hashes"]
    argv += [f"--extra={e}" for e in lock.extras]
    if lock.constrained:
        argv += ["-c", DEV.path]
    argv += ["--quiet", "-o", lock.path, *extra_args]
    done = run(argv)
    return None if done.returncode == 0 else f"{lock.path}: uv pip compile failed\n{done.stderr}"


def check_wheels(uv: str, lock: Lock, version: str) -> str | None:
    """Resolve the lock's own pins for one version and platform, wheels only, nothing else."""
    argv = [uv, "pip", "compile", lock.path, "--no-deps", "--only-binary", ":all:", "--python-version", version]
    argv += ["--python-platform", PLATFORM, "--quiet", "--no-header", "-o", "/dev/null"]
    # The compile just fetched every index page this needs: offline it takes a second, not 15. A
    # failure is asked again online, so a cold cache cannot fail it.
    done = run([*argv, "--offline"])
    if done.returncode != 0:
        done = run(argv)
    if done.returncode == 0:
        return None
    return (
        f"{lock.path} has no wheel for CPython {version} on {PLATFORM}:\n{done.stderr.strip()}\n"
        f"Either pin a version that has one, or give that dependency a marker in pyproject.toml "
        f"(e.g. `; python_version < '{version}'`) and make its extra refuse on {version} (docs/install.md)."
    )


def check_no_addresses(lock: Lock) -> str | None:
    text = (ROOT / lock.path).read_text()
    found = [word for word in FORBIDDEN if word in text]
    return f"{lock.path} records {found}: no download address may be committed" if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uv", default="uv", help="the uv executable")
    parser.add_argument("--versions", required=True, help='supported CPython versions, oldest first: "3.11 3.12"')
    parser.add_argument("uv_args", nargs="*", help="passed to every compile, e.g. --upgrade")
    args = parser.parse_args(argv)
    versions: list[str] = args.versions.split()
    floor = versions[0]

    # dev.txt first: the others are constrained to it. Then the rest side by side (network-bound).
    errors = [e for e in [compile_lock(args.uv, DEV, floor, args.uv_args)] if e]
    if not errors:
        with ThreadPoolExecutor(max_workers=4) as pool:
            rest = [lock for lock in LOCKS if lock is not DEV]
            errors += [e for e in pool.map(lambda x: compile_lock(args.uv, x, floor, args.uv_args), rest) if e]
    if not errors:
        jobs = [(lock, v) for lock in LOCKS for v in versions]
        with ThreadPoolExecutor(max_workers=4) as pool:
            errors += [e for e in pool.map(lambda job: check_wheels(args.uv, *job), jobs) if e]
        errors += [e for e in map(check_no_addresses, LOCKS) if e]
    for error in errors:
        print(error, file=sys.stderr)
    if not errors:
        names = ", ".join(lock.path for lock in LOCKS)
        print(f"locked {names}; wheels for CPython {', '.join(versions)} on {PLATFORM}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
