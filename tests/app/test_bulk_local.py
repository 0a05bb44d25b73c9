"""`lungserve predict --local` in this process: the app's own doors (API keys included) with no socket."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from service.clients.bulk import RunOptions, UsageError, run

pytestmark = pytest.mark.anyio

KEY = "bulk-key-0123456789abcdef"


async def test_local_run_goes_through_the_same_doors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_images: list[Path]
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"bulk:{KEY}\n")
    monkeypatch.setenv("LUNGSERVE_PROVIDER", "cpu")
    monkeypatch.setenv("LUNGSERVE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("LUNGSERVE_API_KEYS_FILE", str(keys))
    out = tmp_path / "out.csv"

    with pytest.raises(UsageError, match="401 unauthorized"):
        await run(real_images, out, RunOptions(local=True, progress=False))
    assert not out.exists()

    summary = await run(real_images, out, RunOptions(local=True, progress=False, api_key=KEY))
    assert (summary.classified, summary.failed, summary.skipped) == (len(real_images), 0, 0)
    with out.open(newline="") as f:
        assert [row["file"] for row in csv.DictReader(f)] == [str(p) for p in real_images]

    again = await run(real_images, out, RunOptions(local=True, progress=False, api_key=KEY))
    assert (again.classified, again.skipped) == (0, len(real_images))
