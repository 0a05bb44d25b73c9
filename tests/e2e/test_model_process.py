"""The model process and the fronts' `RemoteModelClient`: real processes, real ONNX Runtime.

What only the process boundary can get wrong: the queue bound shared by every front, the model
process dying under waiting images (JSON 503 at once, then a reconnect), its drain on SIGTERM,
and a hot reload inside it while images keep flowing.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from service.core.queue_bound import QueueBound
from service.errors import ModelNotReady, Overloaded, ShuttingDown
from tests.model_process import model_process
from tests.onnx_models import write_model_v2_dir

pytestmark = pytest.mark.anyio


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (128, 128, 3), dtype=np.uint8)


async def test_the_queue_bound_holds_across_fronts(tmp_path: Path) -> None:
    write_model_v2_dir(tmp_path / "model")
    with model_process(tmp_path, queue_limit=4, LUNGSERVE_MAX_FILES_PER_REQUEST="4") as mp:
        a, b = mp.client(0), mp.client(1)
        await a.start()
        await b.start()
        held = a.reserve(3)
        assert b.has_room()
        with pytest.raises(Overloaded) as refused:
            b.reserve(2)  # 3 + 2 > 4, though b itself holds nothing
        assert refused.value.retry_after_s == 1
        one = b.reserve(1)
        assert not a.has_room()
        assert not b.has_room()
        result, info = await b.infer(one, _image(0))  # answered: its slot is free again
        assert result.manifest.version == "2"
        assert info.size >= 1
        assert b.has_room()
        held.release()
        assert a.reserve(4).remaining == 4
        await a.stop(5.0)
        await b.stop(5.0)


async def test_waiting_images_get_503_when_the_model_process_dies_then_it_reconnects(tmp_path: Path) -> None:
    write_model_v2_dir(tmp_path / "model")
    with model_process(tmp_path) as mp:
        client = mp.client()
        await client.start()
        assert mp.proc is not None
        os.kill(mp.proc.pid, signal.SIGSTOP)  # the images below wait: it reads nothing now
        reservation = client.reserve(3)
        waiting = [asyncio.ensure_future(client.infer(reservation, _image(i))) for i in range(3)]
        await asyncio.sleep(0)  # let them reach the socket (not a synchronisation: they wait anyway)
        os.kill(mp.proc.pid, signal.SIGKILL)
        mp.proc.wait()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(o, ModelNotReady) and o.status == 503 for o in outcomes), outcomes
        assert not client.ready
        assert QueueBound(mp.bound_path, 9, 256).used == 0  # every slot came back
        with pytest.raises(ModelNotReady):
            client.reserve(1)  # ... but nothing is admitted while it is down
        mp.start()  # what the supervisor does
        await client.until_ready()
        with client.reserve(1) as again:
            result, _ = await client.infer(again, _image(7))
        assert result.manifest.version == "2"
        await client.stop(5.0)


async def test_sigterm_answers_every_admitted_image(tmp_path: Path) -> None:
    write_model_v2_dir(tmp_path / "model")
    with model_process(tmp_path) as mp:
        client = mp.client()
        await client.start()
        assert mp.proc is not None
        os.kill(mp.proc.pid, signal.SIGSTOP)
        reservation = client.reserve(8)
        waiting = [asyncio.ensure_future(client.infer(reservation, _image(i))) for i in range(8)]
        await asyncio.sleep(0)
        os.kill(mp.proc.pid, signal.SIGTERM)
        os.kill(mp.proc.pid, signal.SIGCONT)
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        # Served, or refused as shutting down (JSON 503): never lost, never a 500.
        assert all(isinstance(o, (tuple, ShuttingDown)) for o in outcomes), outcomes
        assert mp.stop() == 0
        await client.stop(1.0)


async def test_reload_inside_the_model_process_fails_nothing(tmp_path: Path) -> None:
    write_model_v2_dir(tmp_path / "model", version="2")
    with model_process(tmp_path, LUNGSERVE_MAX_BATCH_SIZE="4") as mp:
        client = mp.client()
        await client.start()
        versions: list[str] = []
        stop = asyncio.Event()
        before_swap = asyncio.Event()
        after_swap = asyncio.Event()

        async def load() -> None:
            i = 0
            while not stop.is_set():
                with client.reserve(2) as r:
                    results = await asyncio.gather(*(client.infer(r, _image(i + k)) for k in range(2)))
                versions.extend(res.manifest.version for res, _ in results)
                if len(versions) >= 8:
                    before_swap.set()
                if versions.count("3") >= 8:
                    after_swap.set()
                i += 2

        loaders = [asyncio.ensure_future(load()) for _ in range(4)]
        await before_swap.wait()  # answers of version 2 first
        write_model_v2_dir(tmp_path / "model", version="3", bias=[0.0, 1.0, 0.0])
        answer = await client.reload()
        assert answer["changed"]
        assert answer["current"]["version"] == "3"
        assert client.identity.version == "3"
        await after_swap.wait()  # images classified by the new model
        stop.set()
        await asyncio.gather(*loaders)  # any failed image would raise here
        assert versions[-1] == "3"
        assert "2" in versions
        await client.stop(5.0)
