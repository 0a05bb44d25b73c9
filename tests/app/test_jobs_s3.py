"""Slide jobs on S3 (a moto server on 127.0.0.1): the store, and slides read from s3:// URIs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.app.conftest import serve
from tests.app.test_jobs import COLUMNS, ROWS, jobs_settings, state_is, submit, wait_for
from tests.images import noise
from tests.s3fixtures import MotoServer, boto3_client, moto_server, set_dummy_aws_env
from tests.slides import CELL, spread, write_slide

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture
def bucket(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    set_dummy_aws_env(monkeypatch)
    name = f"jobs-{uuid.uuid4().hex[:12]}"
    boto3_client("s3", moto.url).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cells = {c: np.asarray(noise(CELL, seed=i)) for i, c in enumerate(spread(4, COLUMNS, ROWS, seed=3))}
    return write_slide(tmp_path_factory.mktemp("s3slide") / "slide.tif", COLUMNS * CELL, ROWS * CELL, cells)


def keys(moto: MotoServer, bucket: str, prefix: str) -> list[str]:
    listed = boto3_client("s3", moto.url).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


async def test_an_s3_slide_runs_with_its_state_and_results_on_s3(moto: MotoServer, bucket: str, slide: Path) -> None:
    boto3_client("s3", moto.url).upload_file(str(slide), bucket, "cases/1/slide.tif")
    settings = jobs_settings(jobs_uri=f"s3://{bucket}/jobs", s3_endpoint_url=moto.url)
    async with serve(settings) as s:
        response = await s.client.post("/jobs", json={"uri": f"s3://{bucket}/cases/1/slide.tif"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        seen = await wait_for(s, job_id, state_is("done", "failed", "cancelled"))
        assert seen[-1]["state"] == "done", seen[-1]
        assert seen[-1]["source"] == "s3"
        stored = keys(moto, bucket, f"jobs/{job_id}/")
        for name in ("job.json", "result.json", "classmap.png", "thumb.png"):
            assert f"jobs/{job_id}/{name}" in stored
        assert any(k.startswith(f"jobs/{job_id}/tiles/") for k in stored)
        result = (await s.client.get(f"/jobs/{job_id}/result")).json()
        assert result["summary"]["tissue_tiles"] == 4

    # A new server on the same store knows the job (nothing lives only in memory).
    async with serve(settings) as s:
        listed = (await s.client.get("/jobs")).json()["jobs"]
        assert [(j["id"], j["state"]) for j in listed] == [(job_id, "done")]
        assert (await s.client.get(f"/jobs/{job_id}/classmap.png")).status_code == 200


async def test_an_upload_is_stored_on_s3_until_its_job_ends(moto: MotoServer, bucket: str, slide: Path) -> None:
    async with serve(jobs_settings(jobs_uri=f"s3://{bucket}/jobs", s3_endpoint_url=moto.url)) as s:
        job = await submit(s, slide)
        seen = await wait_for(s, job["id"], state_is("done", "failed", "cancelled"))
        assert seen[-1]["state"] == "done", seen[-1]
        assert f"jobs/{job['id']}/source" not in keys(moto, bucket, "jobs/")  # removed once done


async def test_a_missing_s3_slide_fails_the_job_with_the_reason(moto: MotoServer, bucket: str) -> None:
    async with serve(jobs_settings(jobs_uri=f"s3://{bucket}/jobs", s3_endpoint_url=moto.url)) as s:
        response = await s.client.post("/jobs", json={"uri": f"s3://{bucket}/no/such/slide.svs"})
        assert response.status_code == 202
        seen = await wait_for(s, response.json()["id"], state_is("done", "failed", "cancelled"))
        assert seen[-1]["state"] == "failed"
        assert "not found" in seen[-1]["error"]
