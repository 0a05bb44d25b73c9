"""ONNX Runtime inference: one session per model, provider policy, warm-up, `infer(batch)`.

Given an `.onnx` path and its manifest, it checks they agree (`validate_signature`, then the
warm-up: docs/model_contract.md) and turns a uint8 batch (N, S, S, 3) into probabilities (N, C)
plus the ood_score (N,) when the manifest maps one. The provider policy (`auto | cuda | cpu`) is
two pure functions, `choose_providers` and `check_active`, testable without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.errors import ModelSourceError, one_line
from service.model.manifest import OOD_SCORE, PROBABILITIES, Manifest
from service.model.preprocess import RESIZE
from service.settings import ProviderPolicy

log = logging.getLogger(__name__)

CUDA: Final = "CUDAExecutionProvider"
CPU: Final = "CPUExecutionProvider"

# Roles of graph outputs in the manifest's `outputs` (the model v2 contract).

# Warm-up probabilities must sum to 1 within this: a model exporting logits would
# otherwise be served with meaningless "confidence" values.
_PROB_SUM_TOLERANCE: Final = 1e-3


class ProviderUnavailable(RuntimeError):
    """The provider policy cannot be met (e.g. `cuda` on a machine where CUDA is not active)."""


def choose_providers(policy: ProviderPolicy, available: Sequence[str]) -> list[str]:
    """The execution providers to request from ORT, most preferred first."""
    if policy == "cpu":
        return [CPU]
    if CUDA in available:
        # CPU stays in the list so that `auto` degrades gracefully; `check_active`
        # decides afterwards whether the result is acceptable.
        return [CUDA, CPU]
    if policy == "cuda":
        raise ProviderUnavailable(
            f"provider policy 'cuda' but this onnxruntime build offers only {list(available)}; "
            "install onnxruntime-gpu (requirements/gpu.txt) or set LUNGSERVE_PROVIDER=auto"
        )
    return [CPU]


def intra_op_threads_for(requested: Sequence[str], configured: int | None) -> int | None:
    """ORT intra-op threads: the configured number, else 1 for a CPU-only session.

    On CPU the decode pool (a thread per core) and the model share the cores. ORT's default
    pool (a spinning thread per core, per run) oversubscribes them and starves decoding; one
    thread per run, with `max_in_flight_batches` runs at once, measured 1.28x the images/s of
    the default at concurrency 32 (docs/benchmarks/ANALYSIS.md). With CUDA, ORT's default stays.
    """
    if configured is not None:
        return configured
    return 1 if list(requested) == [CPU] else None


def check_active(policy: ProviderPolicy, session_providers: Sequence[str]) -> str:
    """The provider really doing the work; raise if the policy forbids it."""
    if not session_providers:
        raise ProviderUnavailable("the ORT session reports no execution provider")
    active = session_providers[0]
    if policy == "cuda" and active != CUDA:
        raise ProviderUnavailable(
            f"provider policy 'cuda' but ORT fell back to {active} (CUDA/cuDNN libraries or the "
            "driver are missing or incompatible); fix the GPU set-up or set LUNGSERVE_PROVIDER=auto"
        )
    if policy == "cpu" and active != CPU:
        raise ProviderUnavailable(f"provider policy 'cpu' but ORT chose {active}")
    return active


class _NodeArg(Protocol):
    """The part of `onnxruntime.NodeArg` the checks use (a protocol so tests can fake it)."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[Any]: ...


def _is_dynamic(dim: object) -> bool:
    # ORT reports a symbolic dimension as its name (str) or None; a fixed one as int.
    return not isinstance(dim, int) or dim < 0


def validate_signature(manifest: Manifest, inputs: Sequence[_NodeArg], outputs: Sequence[_NodeArg]) -> None:
    """Refuse a model whose graph does not match what its manifest promises."""

    def fail(what: str) -> ModelSourceError:
        return ModelSourceError(f"model {manifest.name} {manifest.version}: {what}")

    if manifest.input_dtype != "uint8":
        raise fail(f"manifest input_dtype is {manifest.input_dtype!r}; the service feeds uint8")
    if manifest.resize != RESIZE:
        raise fail(f"manifest resize {manifest.resize} differs from this service's preprocessing {RESIZE}")
    if len(inputs) != 1:
        raise fail(f"expected exactly one graph input, found {[i.name for i in inputs]}")
    inp = inputs[0]
    if inp.name != manifest.input_name:
        raise fail(f"graph input is {inp.name!r}, manifest says {manifest.input_name!r}")
    if inp.type != "tensor(uint8)":
        raise fail(f"graph input {inp.name!r} is {inp.type}, expected tensor(uint8)")
    size = manifest.input_size
    shape = list(inp.shape)
    if len(shape) != 4 or not _is_dynamic(shape[0]) or shape[1:] != [size, size, 3]:
        raise fail(f"graph input shape is {shape}, expected [batch, {size}, {size}, 3] with a dynamic batch")
    by_name = {o.name: o for o in outputs}
    out = by_name.get(manifest.output_name)
    if out is None:
        raise fail(f"graph has no output {manifest.output_name!r} (outputs: {sorted(by_name)})")
    if out.type != "tensor(float)":
        raise fail(f"graph output {out.name!r} is {out.type}, expected tensor(float)")
    oshape = list(out.shape)
    n_classes = len(manifest.classes)
    if len(oshape) != 2 or (isinstance(oshape[1], int) and oshape[1] != n_classes):
        raise fail(f"graph output shape is {oshape}, expected [batch, {n_classes}] ({n_classes} classes)")
    roles = manifest.outputs or {}
    if roles.get(PROBABILITIES, manifest.output_name) != manifest.output_name:
        raise fail(f"outputs.{PROBABILITIES} is {roles[PROBABILITIES]!r} but output_name is {manifest.output_name!r}")
    ood_name = roles.get(OOD_SCORE)
    if ood_name is not None:
        ood = by_name.get(ood_name)
        if ood is None:
            raise fail(f"manifest lists ood_score output {ood_name!r}; the graph has {sorted(by_name)}")
        if ood.type != "tensor(float)" or len(list(ood.shape)) != 1:
            raise fail(f"graph output {ood_name!r} is {ood.type} {list(ood.shape)}, expected float [batch]")


@dataclass(frozen=True)
class ModelOutputs:
    """What the serving hot path fetches from the graph for a batch of N images."""

    probabilities: NDArray[np.float32]  # (N, C), manifest class order
    ood_score: NDArray[np.float32] | None  # (N,), larger = further from the training data; None: no such output


class Engine:
    """An ORT session for one model version. Thread-safe: `run` may be called concurrently."""

    def __init__(
        self,
        onnx_path: Path,
        manifest: Manifest,
        *,
        provider: ProviderPolicy = "auto",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        self._manifest = manifest
        available = ort.get_available_providers()
        requested = choose_providers(provider, available)
        if CUDA in requested and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu[cuda,cudnn] ships CUDA/cuDNN as pip wheels; ORT only finds them
            # when they are preloaded (otherwise it silently falls back to CPU).
            try:
                ort.preload_dlls()
            except Exception as exc:  # a failed preload is diagnosed by check_active below
                log.warning("onnxruntime.preload_dlls() failed: %s", exc)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = intra_op_threads_for(requested, intra_op_threads)
        if threads is not None:
            options.intra_op_num_threads = threads
        if inter_op_threads is not None:
            options.inter_op_num_threads = inter_op_threads
        try:
            self._session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=requested)
        except Exception as exc:  # ORT raises its own exception types for unreadable graphs
            raise ModelSourceError(
                f"not a loadable ONNX model: {onnx_path.name}: onnxruntime cannot load it: {one_line(exc, 200)}"
            ) from exc

        ood_name = manifest.ood_output
        self._fetch = [manifest.output_name] + ([ood_name] if ood_name is not None else [])
        self._provider = check_active(provider, self._session.get_providers())
        try:
            validate_signature(manifest, self._session.get_inputs(), self._session.get_outputs())
        except ModelSourceError as exc:
            raise ModelSourceError(f"manifest does not fit the model: {one_line(exc)}") from exc
        if provider == "auto" and CUDA in requested and self._provider != CUDA:
            log.warning("CUDA provider is installed but not active; running on %s", self._provider)
        log.info("model %s %s loaded on %s (requested %s)", manifest.name, manifest.version, self._provider, requested)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def provider(self) -> str:
        """The execution provider ORT really uses (e.g. CPUExecutionProvider)."""
        return self._provider

    @property
    def input_size(self) -> int:
        return self._manifest.input_size

    def infer(self, batch: NDArray[np.uint8]) -> ModelOutputs:
        """uint8 (N, S, S, 3) -> probabilities, and the ood_score when the manifest lists one.

        Only these two: the graph's other outputs (feature maps, Grad-CAM weights) cost memory
        and copies that the hot path does not need.
        """
        size = self._manifest.input_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(f"batch must be uint8 (N, {size}, {size}, 3), got {batch.dtype} {batch.shape}")
        n = batch.shape[0]
        outs = self._session.run(self._fetch, {self._manifest.input_name: batch})
        probs = np.asarray(outs[0], dtype=np.float32)
        if probs.shape != (n, len(self._manifest.classes)):
            raise ValueError(f"model returned shape {probs.shape} for a batch of {n}")
        ood = None
        if len(outs) > 1:
            ood = np.asarray(outs[1], dtype=np.float32)
            if ood.shape != (n,):
                raise ValueError(f"model returned ood_score shape {ood.shape} for a batch of {n}")
        return ModelOutputs(probs, ood)

    @property
    def output_names(self) -> list[str]:
        """Every output of the graph (the hot path fetches only the probabilities)."""
        return [o.name for o in self._session.get_outputs()]

    def run_outputs(self, batch: NDArray[np.uint8], names: list[str]) -> list[NDArray[np.float32]]:
        """The named outputs for a uint8 batch (N, S, S, 3): /explain's one ORT run."""
        size = self._manifest.input_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(f"batch must be uint8 (N, {size}, {size}, 3), got {batch.dtype} {batch.shape}")
        outputs = self._session.run(names, {self._manifest.input_name: batch})
        return [np.asarray(out, dtype=np.float32) for out in outputs]

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run every batch shape once, so no request pays for lazy allocation or kernel tuning.

        Together with `__init__` this is the model's one verification (ONNX Runtime loads it, its
        signature fits the manifest, every batch shape yields a probability row per image).
        """
        size = self._manifest.input_size
        sizes = list(batch_sizes)
        for n in sizes:
            # Mid-grey rather than zeros: closer to real input for any data-dependent path.
            batch = np.full((n, size, size, 3), 128, dtype=np.uint8)
            try:
                outputs = self.infer(batch)
            except ValueError as exc:
                raise ModelSourceError(f"warm-up with batch {n} failed: {exc}") from exc
            probs = outputs.probabilities
            if outputs.ood_score is not None and not np.all(np.isfinite(outputs.ood_score)):
                raise ModelSourceError(f"warm-up with batch {n}: ood_score is not finite")
            if not np.all(np.isfinite(probs)) or np.any(probs < 0) or np.any(probs > 1):
                raise ModelSourceError(f"warm-up with batch {n}: output is not probabilities in [0, 1]")
            if np.max(np.abs(probs.sum(axis=1) - 1.0)) > _PROB_SUM_TOLERANCE:
                raise ModelSourceError(f"warm-up with batch {n}: output rows do not sum to 1 (not probabilities)")
        log.info("warm-up done for batch sizes %s", _describe(sizes))


def _describe(sizes: Iterable[int]) -> str:
    s = sorted(set(sizes))
    if s and s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}..{s[-1]}"
    return str(s)
