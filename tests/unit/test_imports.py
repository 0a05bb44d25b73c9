"""What a serving process imports: every front and the model process pay for each module in
memory (docs/topology.md), so the heavy optional ones load only when their feature is used."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

ENTRY_POINTS = ("service.app", "service.processes.front", "service.processes.model", "service.cli")
# The AWS SDK (~20 MiB per process) only for s3:// URIs; TensorFlow never (export only).
NOT_AT_IMPORT = ("aioboto3", "aiobotocore", "boto3", "botocore", "tensorflow", "keras", "tf2onnx")


def test_serving_entry_points_import_no_aws_sdk_and_no_tensorflow() -> None:
    probe = (
        "import importlib, json, sys\n"
        f"for name in {ENTRY_POINTS!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    assert not loaded & set(NOT_AT_IMPORT), sorted(loaded & set(NOT_AT_IMPORT))
    assert "onnxruntime" in loaded  # the probe ran the real imports


def test_the_supervisor_imports_only_the_standard_library_and_its_own_modules() -> None:
    """`lungserve serve` execs into it: it must not load back what the exec dropped."""
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"  # what the interpreter's start-up (site hooks) loaded
        "import service.processes.supervisor\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    assert "service" in loaded
    assert loaded - set(sys.stdlib_module_names) == {"service"}
