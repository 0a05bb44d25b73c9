"""tools/locks.py: `make test` runs the suite and the other-version matrix side by side, so builds
in the checkout and apt installs must exclude each other across processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tools.locks import checkout_lock, checkout_name, file_lock, lock_path

# Another process tries the lock without waiting: exit 0 if it got it, 1 if it is held.
_TRY = """
import fcntl, sys
with open(sys.argv[1], "a") as f:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(1)
"""


def other_process_gets(path: Path) -> bool:
    return subprocess.run([sys.executable, "-c", _TRY, str(path)], timeout=60, check=False).returncode == 0


def test_a_held_lock_excludes_another_process_until_released() -> None:
    name = "test-locks"
    with file_lock(name):
        assert not other_process_gets(lock_path(name))
    assert other_process_gets(lock_path(name))


def test_the_checkout_lock_is_one_per_checkout(tmp_path: Path) -> None:
    assert checkout_name(ROOT) == checkout_name(ROOT / "tests" / "..")
    assert checkout_name(ROOT) != checkout_name(tmp_path)
    with checkout_lock(ROOT):
        assert not other_process_gets(lock_path(checkout_name(ROOT)))
        assert other_process_gets(lock_path(checkout_name(tmp_path)))


def test_the_command_line_runs_a_command_holding_the_checkout_lock() -> None:
    probe = (
        f"import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', {_TRY!r}, sys.argv[1]]).returncode)"
    )
    path = str(lock_path(checkout_name(ROOT)))
    held = subprocess.run([sys.executable, "-m", "tools.locks", "--", sys.executable, "-c", probe, path], cwd=ROOT)
    assert held.returncode == 1  # the command's own status: the lock was held while it ran
    assert other_process_gets(lock_path(checkout_name(ROOT)))
