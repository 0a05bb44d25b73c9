"""`make test`'s other-version matrix: for every supported CPython other than the one `make` uses,
a venv of its own from the hashed locks (requirements/test.txt: serving + test tools, no
TensorFlow), then the unit and app layers and the wheel test (a real `lungserve serve` from a
wheel installed outside the checkout) on that version.

Interpreters are found as `python3.X` on PATH, then under pyenv's root (`pyenv root`,
$PYENV_ROOT, ~/.pyenv). A version that is not found is reported; with CI set it is an error, so
CI cannot pass on fewer versions than it claims. Each venv is reused while its interpreter and
the locks it was made from are unchanged, and made anew otherwise.

Standard library only. Run as `python -m tools.matrix` from the checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tools.locks import checkout_lock

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ("requirements/test.txt", "requirements/build.txt", "pyproject.toml")
TESTS = ("tests/unit", "tests/app", "tests/e2e/test_wheel.py")
STAMP = "lungserve-matrix.json"
_PROBE = "import sys; print('%d.%d' % sys.version_info[:2], sys.implementation.name, sys.executable)"


@dataclass(frozen=True)
class Interpreter:
    version: str
    path: Path


def _probe(candidate: Path | str, version: str) -> Interpreter | None:
    """The candidate if it runs and is CPython `version` (a pyenv shim of an inactive version fails)."""
    try:
        done = subprocess.run([str(candidate), "-c", _PROBE], capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    if done.returncode != 0:
        return None
    found, implementation, executable = done.stdout.split(maxsplit=2)
    if found != version or implementation != "cpython":
        return None
    return Interpreter(version, Path(executable.strip()))


def _pyenv_roots() -> list[Path]:
    roots = [Path(os.environ["PYENV_ROOT"])] if os.environ.get("PYENV_ROOT") else []
    pyenv = shutil.which("pyenv")
    if pyenv:
        done = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30, check=False)
        if done.returncode == 0 and done.stdout.strip():
            roots.append(Path(done.stdout.strip()))
    roots.append(Path.home() / ".pyenv")
    return list(dict.fromkeys(roots))


def find(version: str) -> Interpreter | None:
    on_path = shutil.which(f"python{version}")
    if on_path and (found := _probe(on_path, version)):
        return found
    # pyenv's builds of that version, newest patch release first (no -dev, no free-threaded "t").
    release = re.compile(rf"^{re.escape(version)}\.(\d+)$")
    for root in _pyenv_roots():
        builds = [
            (int(m.group(1)), d) for d in (root / "versions").glob(f"{version}.*") if (m := release.match(d.name))
        ]
        for _, build in sorted(builds, reverse=True):
            if found := _probe(build / "bin" / f"python{version}", version):
                return found
    return None


def _digest(interpreter: Interpreter) -> str:
    h = hashlib.sha256(str(interpreter.path).encode())
    for name in LOCKS:
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def _run(argv: list[str], **kwargs: object) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def prepare(interpreter: Interpreter, venv: Path) -> float:
    """The venv for one version, from the locks (hash-checked); seconds spent installing."""
    stamp = venv / STAMP
    want = {"interpreter": str(interpreter.path), "digest": _digest(interpreter)}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return 0.0
    start = time.monotonic()
    _run([str(interpreter.path), "-m", "venv", "--clear", str(venv)])
    # --no-compile: byte-compiling every dependency doubles the install; imports compile lazily.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--no-input", "install", "-q"]
    pip.append("--no-compile")
    _run([*pip, "--require-hashes", "-r", "requirements/test.txt"])
    _run([*pip, "--require-hashes", "-r", "requirements/build.txt"])
    with checkout_lock(ROOT):  # the suite's wheel test may be building in this checkout meanwhile
        _run([*pip, "--no-deps", "--no-build-isolation", "-e", "."])
    stamp.write_text(json.dumps(want))
    return time.monotonic() - start


def test(venv: Path) -> None:
    # -m "not slow": TensorFlow is not installed here (the default run has it); no cache: the
    # default run's --lf state stays its own.
    _run([str(venv / "bin" / "python"), "-m", "pytest", *TESTS, "-m", "not slow", "-p", "no:cacheprovider", "-q"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venvs", type=Path, required=True, help="folder for one venv per version")
    parser.add_argument("--supported", required=True, help='supported versions: "3.11 3.12 3.13"')
    parser.add_argument("--skip", default="", help="the version the full suite runs on")
    parser.add_argument("versions", nargs="*", default=["auto"], help='"auto", "none", or versions (3.12 3.13)')
    args = parser.parse_args(argv)
    supported = args.supported.split()
    if args.versions in (["none"], []):
        print("matrix: none asked for")
        return 0
    auto = args.versions == ["auto"]
    wanted = [v for v in supported if v != args.skip] if auto else args.versions
    unsupported = [v for v in wanted if v not in supported]
    if unsupported:
        print(f"matrix: {unsupported} not supported (supported: {supported})", file=sys.stderr)
        return 2

    found: list[Interpreter] = []
    missing: list[str] = []
    for version in wanted:
        interpreter = find(version)
        if interpreter is None:
            missing.append(version)
        else:
            found.append(interpreter)
    if missing:
        message = (
            f"matrix: no CPython {', '.join(missing)} found (python3.X on PATH, or pyenv: pyenv install {missing[0]})"
        )
        if not auto or os.environ.get("CI"):
            print(message + "; CI (or an explicit list) needs every one", file=sys.stderr)
            return 1
        print(message + "; not tested here", file=sys.stderr)

    for interpreter in found:
        print(f"matrix: CPython {interpreter.version} ({interpreter.path})", flush=True)
        venv = args.venvs / interpreter.version
        installed = prepare(interpreter, venv)
        start = time.monotonic()
        try:
            test(venv)
        except subprocess.CalledProcessError as e:
            print(f"matrix: CPython {interpreter.version} failed (exit {e.returncode})", file=sys.stderr)
            return 1
        took = time.monotonic() - start
        print(f"matrix: CPython {interpreter.version} ok (install {installed:.0f} s, tests {took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
