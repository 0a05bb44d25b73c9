"""Cross-process locks for `make test`, which runs the suite and the other-version matrix side by
side: setuptools writes lungserve.egg-info/ into the checkout on every build or editable install,
and apt (a test installing a system tool) takes one install at a time.

Standard library only (tools/matrix.py uses it).
"""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


def lock_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"lungserve-{name}.lock"


@contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on `name` in the temporary directory (released at exit, or when the
    process dies: flock locks die with their file descriptor)."""
    with lock_path(name).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def checkout_name(root: Path) -> str:
    return "build-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


def checkout_lock(root: Path) -> AbstractContextManager[None]:
    """One build (sdist, wheel, editable install) at a time in the checkout at `root`."""
    return file_lock(checkout_name(root))


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.locks -- CMD ...`: run CMD holding this checkout's build lock (the Makefile's
    editable installs, while the matrix may be installing into its venvs)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m tools.locks -- CMD [ARG ...]", file=sys.stderr)
        return 2
    with checkout_lock(Path(__file__).resolve().parents[1]):
        return subprocess.run(args, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
