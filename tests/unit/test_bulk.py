"""`lungserve predict`'s pure parts: walking, chunking to the server's limits, resumable output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from service.clients.bulk import PART_OVERHEAD_BYTES, Output, UsageError, chunked, to_row, walk
from service.clients.http_client import Prediction

CLASSES = ["lung_aca", "lung_n", "lung_scc"]


def test_walk_takes_images_from_folders_and_files_as_given(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/2.jpeg", "a/1.PNG", "a/deep/3.tif", "a/notes.txt", "b.dat"):
        (tmp_path / name).write_bytes(b"x")
    found = walk([tmp_path / "a", tmp_path / "b.dat", tmp_path / "a" / "1.PNG"])
    assert found == [tmp_path / "a/1.PNG", tmp_path / "a/2.jpeg", tmp_path / "a/deep/3.tif", tmp_path / "b.dat"]
    with pytest.raises(UsageError, match="no such file"):
        walk([tmp_path / "missing"])


def test_chunks_respect_file_count_and_bytes() -> None:
    sizes = [(Path(f"{i}.jpeg"), 1000) for i in range(7)]
    assert [len(c) for c in chunked(sizes, max_files=3, max_bytes=10**9)] == [3, 3, 1]
    per_file = 1000 + PART_OVERHEAD_BYTES
    assert [len(c) for c in chunked(sizes, max_files=64, max_bytes=2 * per_file)] == [2, 2, 2, 1]
    # A file alone over the byte budget still goes, alone (the server judges it).
    assert [len(c) for c in chunked([(Path("big"), 10**6)], max_files=4, max_bytes=10)] == [1]
    assert [p for c in chunked(sizes, 3, 10**9) for p in c] == [p for p, _ in sizes]


def ok(file: str) -> Prediction:
    return Prediction(
        file=file,
        label="lung_n",
        confidence=0.9,
        probabilities={"lung_aca": 0.05, "lung_n": 0.9, "lung_scc": 0.05},
        decision="accept",
        reason=None,
        model_version="v1",
    )


def failed(file: str) -> Prediction:
    return Prediction(file=file, error_code="invalid_image", error_message="not an image")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_keeps_successful_rows_and_retries_failed_ones(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    output = Output(path, CLASSES)
    assert output.resume() == set()
    output.append([to_row(ok("a.jpeg"), CLASSES), to_row(failed("b.jpeg"), CLASSES)])
    output.append([to_row(ok("c.jpeg"), CLASSES)])

    again = Output(path, CLASSES)
    assert again.resume() == {"a.jpeg", "c.jpeg"}
    again.append([to_row(ok("b.jpeg"), CLASSES)])

    text = path.read_text()
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        assert list(rows[0]) == [
            "file",
            "label",
            "confidence",
            "prob_lung_aca",
            "prob_lung_n",
            "prob_lung_scc",
            "decision",
            "reason",
            "model_version",
            "error",
        ]
        assert rows[0]["prob_lung_n"] == "0.9"
    else:
        rows = [json.loads(line) for line in text.splitlines()]
        assert rows[0]["probabilities"] == {"lung_aca": 0.05, "lung_n": 0.9, "lung_scc": 0.05}
    assert [r["file"] for r in rows] == ["a.jpeg", "c.jpeg", "b.jpeg"]  # each file once
    assert all(not r["error"] for r in rows)
    assert rows[0]["decision"] == "accept"
    assert rows[0]["model_version"] == "v1"


def test_output_refuses_other_suffixes_and_other_models(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\.csv or \.jsonl"):
        Output(tmp_path / "out.txt", CLASSES)
    path = tmp_path / "out.csv"
    Output(path, CLASSES).append([to_row(ok("a.jpeg"), CLASSES)])
    with pytest.raises(UsageError, match="columns"):
        Output(path, ["benign", "malignant"]).resume()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_row_cut_short_by_a_crash_is_tried_again(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    Output(path, CLASSES).append([to_row(ok("a.jpeg"), CLASSES), to_row(ok("b.jpeg"), CLASSES)])
    text = path.read_text()
    path.write_text(text[: text.rindex("b.jpeg") + 20])  # the last row stops mid-way
    assert Output(path, CLASSES).resume() == {"a.jpeg"}
