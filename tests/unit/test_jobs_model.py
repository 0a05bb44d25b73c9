"""Slide jobs, pure parts: the state machine, records, summary, GeoJSON; the local job store."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.jobs.store import LocalJobStore, get_json, open_store, put_json
from service.model.source.uri import S3Options, parse_slide_uri
from service.pathology.jobs import (
    REFER_SUFFIX,
    InvalidTransition,
    Job,
    JobState,
    TileRecord,
    chunk_document,
    chunk_records,
    geojson,
    is_job_id,
    new_job_id,
    summary,
    tile_answers,
)
from service.pathology.tiles import Tile, count_tiles, tile_grid

CLASSES = ["lung_aca", "lung_n", "lung_scc"]


def test_a_job_moves_only_along_the_state_machine() -> None:
    job = Job(id=new_job_id(), owner=None, source="upload")
    assert job.state is JobState.QUEUED
    job.move(JobState.RUNNING)
    started = job.started
    assert started is not None
    job.move(JobState.QUEUED)  # the server stopped under it
    job.move(JobState.RUNNING)
    assert job.started == started  # a resumed job keeps its first start
    job.move(JobState.DONE)
    assert job.finished is not None
    assert job.terminal
    for target in JobState:
        with pytest.raises(InvalidTransition):
            job.move(target)


def test_a_job_record_round_trips_and_its_status_hides_owner_and_uri() -> None:
    job = Job(id=new_job_id(), owner="lab", source="s3://bucket/patient-42.svs", tiles_done=3, tiles_total=9)
    again = Job.from_record(job.to_record())
    assert again == job
    status = job.status("http://x/jobs/1")
    assert status["progress"] == {"tiles_done": 3, "tiles_total": 9}
    assert status["source"] == "s3"
    assert "lab" not in str(status)
    assert "patient-42" not in str(status)


def test_job_ids_are_32_hex_digits_and_nothing_else() -> None:
    assert is_job_id(new_job_id())
    for bad in ("", "../etc", "A" * 32, "a" * 31, "a" * 33):
        assert not is_job_id(bad)


def test_checkpoint_chunks_round_trip() -> None:
    records = [TileRecord(0), TileRecord(5, "lung_n", (0.1, 0.8, 0.1), "refer", "low_confidence")]
    assert chunk_records(chunk_document(records)) == records


def _records() -> tuple[list[Tile], list[TileRecord]]:
    grid = tile_grid(2304, 768, 768)
    records = [
        TileRecord(0, "lung_aca", (0.9, 0.05, 0.05)),
        TileRecord(1),
        TileRecord(2, "lung_scc", (0.3, 0.2, 0.5), "refer", "low_confidence"),
    ]
    return grid, records


def test_summary_and_answers_have_the_analyze_shape() -> None:
    grid, records = _records()
    s = summary(CLASSES, records)
    assert (s["tiles"], s["tissue_tiles"], s["background_tiles"], s["referred_tiles"]) == (3, 2, 1, 1)
    assert s["tissue_share"] == {"lung_aca": 0.5, "lung_n": 0.0, "lung_scc": 0.5}
    answers = tile_answers(CLASSES, grid, records)
    assert [(a["x"], a["y"], a["label"]) for a in answers] == [(0, 0, "lung_aca"), (1536, 0, "lung_scc")]
    assert answers[1]["probabilities"] == {"lung_aca": 0.3, "lung_n": 0.2, "lung_scc": 0.5}


def test_geojson_is_what_qupath_imports_with_referred_tiles_set_apart() -> None:
    grid, records = _records()
    job_id = new_job_id()
    colours = {"lung_aca": "#E69F00", "lung_n": "#56B4E9", "lung_scc": "#CC79A7"}
    collection = geojson(job_id, tile_answers(CLASSES, grid, records), colours, "#222222")
    assert collection["type"] == "FeatureCollection"
    first, referred = collection["features"]
    assert first["geometry"] == {"type": "Polygon", "coordinates": [[[0, 0], [768, 0], [768, 768], [0, 768], [0, 0]]]}
    assert first["properties"]["objectType"] == "tile"
    assert first["properties"]["classification"] == {"name": "lung_aca", "color": [0xE6, 0x9F, 0x00]}
    assert first["properties"]["measurements"]["p_lung_aca"] == 0.9
    assert first["properties"]["measurements"]["refer"] == 0
    assert referred["properties"]["classification"] == {"name": "lung_scc" + REFER_SUFFIX, "color": [0x22] * 3}
    assert referred["properties"]["measurements"]["refer"] == 1
    # Stable ids: the same job exports the same objects.
    again = geojson(job_id, tile_answers(CLASSES, grid, records), colours, "#222222")
    assert [f["id"] for f in again["features"]] == [f["id"] for f in collection["features"]]


def test_the_tile_count_of_a_claimed_size_needs_no_grid() -> None:
    assert count_tiles(2**31, 2**31, 768) == 2796203**2  # checked before anything proportional is built
    assert count_tiles(2304, 900, 768) == len(tile_grid(2304, 900, 768))


@pytest.mark.anyio
async def test_the_local_store_writes_whole_files_and_lists_jobs(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "jobs"), S3Options())
    assert isinstance(store, LocalJobStore)
    assert await store.job_ids() == []  # nothing is created before the first write
    assert not (tmp_path / "jobs").exists()
    await put_json(store, "a" * 32 + "/job.json", {"state": "queued"})
    await put_json(store, "a" * 32 + "/tiles/000000.json", {"tiles": []})
    assert await store.job_ids() == ["a" * 32]
    assert await get_json(store, "a" * 32 + "/job.json") == {"state": "queued"}
    assert await store.get_bytes("missing/job.json") is None
    assert await store.keys("a" * 32 + "/tiles/") == ["a" * 32 + "/tiles/000000.json"]
    assert [p.name for p in (tmp_path / "jobs" / ("a" * 32)).iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("s3://slides/case/1.svs", True),
        ("S3://slides/x.tif", True),
        ("s3://slides/", False),
        ("s3:///key", False),
        ("https://slides/x.tif", False),
        ("s3://slides/x.tif?versionId=1", False),
    ],
)
def test_slide_uris_name_one_object(uri: str, ok: bool) -> None:
    if ok:
        assert parse_slide_uri(uri)[1]
    else:
        with pytest.raises(ValueError, match="expected"):
            parse_slide_uri(uri)


def test_a_jobs_uri_must_be_a_folder_or_s3() -> None:
    with pytest.raises(ValueError, match="LUNGSERVE_JOBS_URI"):
        open_store("https://example.org/jobs", S3Options())
