"""Engine: provider policy (pure functions), manifest/graph checks and real CPU sessions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from service.core.engine import (
    CPU,
    CUDA,
    Engine,
    ProviderUnavailable,
    check_active,
    choose_providers,
    validate_signature,
)
from service.errors import ModelSourceError
from service.model.manifest import Manifest
from service.model.source import load_local_model
from tests.conftest import BUNDLED_MODEL
from tests.onnx_models import model_bytes, write_model_dir

ALL_PROVIDERS = ["TensorrtExecutionProvider", CUDA, CPU]


# --- provider policy: pure ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "available", "expected"),
    [
        ("cpu", ALL_PROVIDERS, [CPU]),
        ("cpu", [CPU], [CPU]),
        ("auto", ALL_PROVIDERS, [CUDA, CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
        ("cuda", ALL_PROVIDERS, [CUDA, CPU]),
    ],
)
def test_choose_providers(policy: Any, available: list[str], expected: list[str]) -> None:
    assert choose_providers(policy, available) == expected


def test_cuda_policy_refuses_a_build_without_cuda() -> None:
    with pytest.raises(ProviderUnavailable, match="onnxruntime-gpu"):
        choose_providers("cuda", ["AzureExecutionProvider", CPU])


@pytest.mark.parametrize(
    ("policy", "session", "expected"),
    [
        ("auto", [CUDA, CPU], CUDA),
        ("auto", [CPU], CPU),  # CUDA requested but ORT fell back silently: auto accepts it
        ("cuda", [CUDA, CPU], CUDA),
        ("cpu", [CPU], CPU),
    ],
)
def test_check_active(policy: Any, session: list[str], expected: str) -> None:
    assert check_active(policy, session) == expected


def test_cuda_policy_refuses_a_silent_fallback_to_cpu() -> None:
    with pytest.raises(ProviderUnavailable, match="fell back to CPUExecutionProvider"):
        check_active("cuda", [CPU])


def test_check_active_refuses_an_empty_provider_list() -> None:
    with pytest.raises(ProviderUnavailable):
        check_active("auto", [])


# --- graph vs manifest: pure, with fake node args ------------------------------------------


@dataclass(frozen=True)
class FakeArg:
    name: str
    type: str
    shape: Sequence[Any]


GOOD_IN = FakeArg("image", "tensor(uint8)", ["N", 8, 8, 3])
GOOD_OUT = FakeArg("probabilities", "tensor(float)", ["N", 3])


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    return write_model_dir(tmp_path / "m")


def test_validate_signature_accepts_the_contract(manifest: Manifest) -> None:
    validate_signature(manifest, [GOOD_IN], [GOOD_OUT])
    validate_signature(manifest, [FakeArg("image", "tensor(uint8)", [None, 8, 8, 3])], [GOOD_OUT])


@pytest.mark.parametrize(
    ("inputs", "outputs", "match"),
    [
        ([FakeArg("pixels", "tensor(uint8)", ["N", 8, 8, 3])], [GOOD_OUT], "graph input is 'pixels'"),
        ([FakeArg("image", "tensor(float)", ["N", 8, 8, 3])], [GOOD_OUT], "expected tensor\\(uint8\\)"),
        ([FakeArg("image", "tensor(uint8)", ["N", 16, 16, 3])], [GOOD_OUT], "expected \\[batch, 8, 8, 3\\]"),
        ([FakeArg("image", "tensor(uint8)", ["N", 3, 8, 8])], [GOOD_OUT], "expected \\[batch, 8, 8, 3\\]"),
        ([FakeArg("image", "tensor(uint8)", [1, 8, 8, 3])], [GOOD_OUT], "dynamic batch"),
        ([GOOD_IN, GOOD_IN], [GOOD_OUT], "exactly one graph input"),
        ([GOOD_IN], [FakeArg("logits", "tensor(float)", ["N", 3])], "no output 'probabilities'"),
        ([GOOD_IN], [FakeArg("probabilities", "tensor(double)", ["N", 3])], "expected tensor\\(float\\)"),
        ([GOOD_IN], [FakeArg("probabilities", "tensor(float)", ["N", 4])], "3 classes"),
    ],
)
def test_validate_signature_refuses_mismatches(
    manifest: Manifest, inputs: list[FakeArg], outputs: list[FakeArg], match: str
) -> None:
    with pytest.raises(ModelSourceError, match=match) as info:
        validate_signature(manifest, inputs, outputs)
    assert "\n" not in str(info.value)


def test_validate_signature_refuses_another_resize(tmp_path: Path) -> None:
    other = write_model_dir(tmp_path / "m", resize={"library": "OpenCV", "filter": "area"})
    with pytest.raises(ModelSourceError, match="resize"):
        validate_signature(other, [GOOD_IN], [GOOD_OUT])


# --- real CPU sessions ----------------------------------------------------------------------


def _expected(batch: np.ndarray) -> np.ndarray:
    """What tests/onnx_models.py's graph computes: softmax(mean colour @ 0.001)."""
    z = batch.astype(np.float32).mean(axis=(1, 2)) @ np.full((3, 3), 0.001, dtype=np.float32)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


def test_cpu_engine_runs_and_reports_its_provider(tmp_path: Path) -> None:
    manifest = write_model_dir(tmp_path / "m")
    engine = Engine(tmp_path / "m" / "model.onnx", manifest, provider="cpu", intra_op_threads=1, inter_op_threads=1)
    assert engine.provider == CPU
    assert (engine.manifest.name, engine.manifest.version, engine.input_size) == ("tiny", "1", 8)
    batch = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    probs = engine.infer(batch).probabilities
    assert probs.dtype == np.float32
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs, _expected(batch), atol=1e-6)
    engine.warm_up(range(1, 5))


def test_auto_policy_reports_what_is_really_active(tmp_path: Path) -> None:
    manifest = write_model_dir(tmp_path / "m")
    engine = Engine(tmp_path / "m" / "model.onnx", manifest, provider="auto")
    if CUDA not in ort.get_available_providers():
        assert engine.provider == CPU
    else:
        assert engine.provider in (CUDA, CPU)


def test_cuda_policy_refuses_to_start_without_cuda(tmp_path: Path) -> None:
    manifest = write_model_dir(tmp_path / "m")
    if CUDA in ort.get_available_providers():
        pytest.skip("a CUDA build of onnxruntime: covered by the pure check_active tests")
    with pytest.raises(ProviderUnavailable, match="'cuda'"):
        Engine(tmp_path / "m" / "model.onnx", manifest, provider="cuda")


def test_engine_refuses_a_manifest_that_does_not_fit(tmp_path: Path) -> None:
    manifest = write_model_dir(tmp_path / "m", classes=["a", "b", "c", "d"])
    with pytest.raises(ModelSourceError, match="4 classes"):
        Engine(tmp_path / "m" / "model.onnx", manifest, provider="cpu")


def test_engine_refuses_an_unloadable_file(tmp_path: Path) -> None:
    manifest = write_model_dir(tmp_path / "m", data=b"not an onnx graph", sha256="0" * 64)
    with pytest.raises(ModelSourceError, match="cannot load"):
        Engine(tmp_path / "m" / "model.onnx", manifest, provider="cpu")


def test_warm_up_refuses_logits(tmp_path: Path) -> None:
    # Without the softmax the outputs are ~0.1..0.4 per class and do not sum to 1.
    manifest = write_model_dir(tmp_path / "m", data=model_bytes(softmax=False))
    engine = Engine(tmp_path / "m" / "model.onnx", manifest, provider="cpu")
    with pytest.raises(ModelSourceError, match="sum to 1"):
        engine.warm_up([1, 2])


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((2, 8, 8, 3), dtype=np.float32),
        np.zeros((2, 16, 16, 3), dtype=np.uint8),
        np.zeros((8, 8, 3), dtype=np.uint8),
    ],
)
def test_run_refuses_a_malformed_batch(tmp_path: Path, batch: np.ndarray) -> None:
    manifest = write_model_dir(tmp_path / "m")
    engine = Engine(tmp_path / "m" / "model.onnx", manifest, provider="cpu")
    with pytest.raises(ValueError, match="batch must be uint8"):
        engine.infer(batch)


def test_bundled_model_loads_and_warms_up() -> None:
    artifact = load_local_model(BUNDLED_MODEL)
    engine = Engine(artifact.onnx_path, artifact.manifest, provider="cpu")
    engine.warm_up([1, 3])
    probs = engine.infer(np.full((3, engine.input_size, engine.input_size, 3), 200, dtype=np.uint8)).probabilities
    assert probs.shape == (3, len(engine.manifest.classes))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_cpu_sessions_default_to_one_intra_op_thread() -> None:
    from service.core.engine import intra_op_threads_for

    assert intra_op_threads_for(["CPUExecutionProvider"], None) == 1
    assert intra_op_threads_for(["CPUExecutionProvider"], 3) == 3
    # With CUDA requested, ORT keeps its own default (the GPU does the work).
    assert intra_op_threads_for(["CUDAExecutionProvider", "CPUExecutionProvider"], None) is None
