"""System tools that some tests need (chromium, promtool, haproxy, kubectl, ...).

Such a test must run in CI, never skip there: `require_tool` finds the command, or installs its
Debian package (as root, the way CI runs), or fails the test saying exactly what is missing.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

from tools.locks import file_lock

# Debian's apt refuses two installs at once: `make test` runs the other-version matrix beside the
# suite, so apt runs under a lock; `cache` keeps one `apt-get update` per test session.
_APT_TIMEOUT_S = 900


@functools.cache
def _apt_updated() -> bool:
    result = subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False)
    return result.returncode == 0


def require_tool(command: str, package: str) -> str:
    """The path of `command`, installing Debian's `package` if it is missing; else fail the test."""
    found = shutil.which(command)
    if found:
        return found
    how = f"apt-get install -y {package}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"{command!r} is missing and cannot be installed here: run `{how}` as root")
    with file_lock("apt"):
        found = shutil.which(command)  # installed by the other run while this one waited
        if found:
            return found
        if not _apt_updated():
            pytest.fail(f"{command!r} is missing and `apt-get update` failed: run `{how}` as root")
        result = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", package],
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT_S,
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    found = shutil.which(command)
    if found is None:
        pytest.fail(f"{command!r} is still missing after `{how}` (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return found
