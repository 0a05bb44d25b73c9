"""API keys file: parsing (errors name the line, never the key) and identification."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.http.access import RECHECK_S, ApiKeys, ApiKeysFileError, KeysFile, is_open

LAB = "lab-viewer-0123456789abcdef"
PIPE = "pipeline-fedcba9876543210"


def test_keys_identify_their_names(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# lungserve keys\n\nviewer:{LAB}\n  pipeline : {PIPE}  \n")
    keys = ApiKeys.load(path)
    assert keys.identify(LAB) == "viewer"
    assert keys.identify(PIPE) == "pipeline"
    assert keys.identify(LAB[:-1]) is None
    assert keys.identify("") is None
    assert LAB not in repr(keys)  # only digests are kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("viewer", "line 1: expected NAME:KEY"),
        ("viewer:", "line 1: expected NAME:KEY"),
        (f"bad name:{LAB}", "line 1: the name"),
        (f"a:{LAB}\na:{PIPE}", "line 2: the name 'a' is used twice"),
        (f"a:{LAB}\nb:{LAB}", "line 2: the key of 'b' is also another name's key"),
        ("a:short", "shorter than 16"),
        ("# nothing\n\n", "no NAME:KEY line"),
    ],
)
def test_bad_files_are_refused_without_showing_keys(text: str, message: str) -> None:
    with pytest.raises(ApiKeysFileError, match=message) as info:
        ApiKeys.parse(text)
    assert LAB not in str(info.value)
    assert PIPE not in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ApiKeysFileError, match="cannot read"):
        ApiKeys.load(tmp_path / "missing")


def test_open_routes() -> None:
    assert is_open("/health/ready")
    assert is_open("/metrics")
    assert is_open("/v2/health/live")
    assert is_open("/docs")
    assert is_open("/admin/reload")  # the admin token guards it instead
    assert is_open("/")  # a page's HTML: a browser opening it cannot send a key
    assert not is_open("/predict")
    assert not is_open("/v2/models/{name}/infer")
    assert not is_open("/model")
    assert not is_open("unmatched")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_rotated_keys_file_is_re_read_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"viewer:{LAB}\n")
    clock = Clock()
    keys = KeysFile(path, clock)
    assert keys.identify(LAB) == "viewer"
    # Rotation as Kubernetes does it: a new file renamed over the old one (a new inode).
    new = tmp_path / "keys.new"
    new.write_text(f"pipeline:{PIPE}\n")
    new.replace(path)
    assert keys.identify(PIPE) is None  # looked at most once per RECHECK_S
    clock.now += RECHECK_S
    assert keys.identify(PIPE) == "pipeline"
    assert keys.identify(LAB) is None


def test_a_broken_new_keys_file_keeps_the_keys_in_force(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    path.write_text(f"viewer:{LAB}\n")
    clock = Clock()
    keys = KeysFile(path, clock)
    path.write_text("viewer:short-and-longer-but-no\nbroken line\n")
    clock.now += RECHECK_S
    with caplog.at_level("WARNING"):
        assert keys.identify(LAB) == "viewer"
    assert "previous keys stay" in caplog.text
    assert LAB not in caplog.text
