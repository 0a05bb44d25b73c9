"""Child process for the streaming test: download one object, report the RSS high-water mark (Linux).

`python -m tests.e2e.stream_probe ENDPOINT BUCKET WARM_KEY WARM_SHA KEY SHA OUT_DIR` prints JSON.
A separate process, so the peak belongs to this download alone and not to the test session.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import aioboto3

from service.model.source.s3 import download_object, s3_client_config


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match is not None, field
    return int(match.group(1))


def reset_peak() -> int:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS and return that.

    getrusage's ru_maxrss cannot be reset: a peak reached while importing would hide the download.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmHWM")


def peak_kib() -> int:
    return _status_kib("VmHWM")


async def main(endpoint: str, bucket: str, warm_key: str, warm_sha: str, key: str, sha: str, out: Path) -> None:
    session = aioboto3.Session()
    async with session.client("s3", endpoint_url=endpoint, config=s3_client_config()) as s3:
        # Warm-up: imports, connection pool, thread pool and chunk buffers all exist afterwards.
        await download_object(s3, bucket, warm_key, out / "warm.bin", sha256=warm_sha)
        before = reset_peak()
        size = await download_object(s3, bucket, key, out / "big.bin", sha256=sha)
        after = peak_kib()
        control_base = reset_peak()
        # Control: the same object read into memory moves the high-water mark by about its size,
        # which shows this measurement would catch a download that buffers the whole object.
        response = await s3.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        async with body:
            data = await body.read()
        control = peak_kib()
    print(
        json.dumps(
            {
                "size": size,
                "before_kib": before,
                "after_kib": after,
                "control_base_kib": control_base,
                "control_kib": control,
                "control_len": len(data),
            }
        )
    )


if __name__ == "__main__":
    endpoint, bucket, warm_key, warm_sha, key, sha, out = sys.argv[1:8]
    asyncio.run(main(endpoint, bucket, warm_key, warm_sha, key, sha, Path(out)))
