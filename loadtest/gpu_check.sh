#!/usr/bin/env bash
# One script for a GPU host, about 8 minutes: is the GPU really used, and how fast is it fed?
#
#     loadtest/gpu_check.sh [OUT_DIR]          (from a checkout with `make dev`'s .venv and the
#                                                gpu lock installed: requirements/gpu.txt)
#
# 1. nvidia-smi: the driver and the GPU;
# 2. ONNX Runtime offers CUDAExecutionProvider, and `lungserve serve` with LUNGSERVE_PROVIDER=cuda
#    (a front per core + one model process, the `auto` placement with CUDA) reports it on /model;
# 3. loadtest/bench.py at c=32, 128 and 512 on the 768 px originals: the single process and the
#    front-per-core + model-process topology side by side;
# 4. feed capacity (loadtest/feed.py): the front-to-model path alone;
# 5. GPU utilisation sampled every second during 3 and 4 (mean and max).
# Everything lands in OUT_DIR (default .bench/gpu-check-<date>); the summary is printed last.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${1:-$ROOT/.bench/gpu-check-$(date -u +%Y%m%dT%H%M%S)}
CORES=$(nproc)
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

echo "== 1. nvidia-smi"
command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no NVIDIA driver here" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.csv"

echo "== 2. CUDA provider"
"$PY" -c 'import onnxruntime as ort, sys; p = ort.get_available_providers(); print(p); sys.exit("CUDAExecutionProvider" not in p)' \
    || { echo "gpu_check: this onnxruntime has no CUDA provider (install requirements/gpu.txt)" >&2; exit 2; }
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LUNGSERVE_PROVIDER=cuda LUNGSERVE_WORKERS=$CORES LUNGSERVE_PORT=$PORT "$PY" -m service.cli serve >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; kill "${SAMPLER:-}" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { echo "gpu_check: the server exited, see $OUT/serve.log" >&2; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/model" | tee "$OUT/model.json" | "$PY" -c \
    'import json, sys; p = json.load(sys.stdin)["provider"]; print("provider:", p); sys.exit(p != "CUDAExecutionProvider")'
ps -eo pid,rss,args | grep "lungserve:" | grep -v grep | tee "$OUT/processes.txt"
kill -TERM "$SERVER"; wait "$SERVER" || true

echo "== 3-5. benchmark, feed capacity, GPU utilisation"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 >"$OUT/gpu-utilisation.csv" &
SAMPLER=$!
"$PY" loadtest/bench.py --systems lungserve,ls-model --image-sets 768 --concurrency 32,128,512 \
    --duration 20 --warmup 5 --allow-busy --lungserve-env LUNGSERVE_PROVIDER=cuda \
    --lungserve-env LUNGSERVE_MAX_BATCH_SIZE_CUDA=64 --out "$OUT/bench" --note "loadtest/gpu_check.sh" \
    | tee "$OUT/bench.log"
"$PY" loadtest/feed.py --feeders "$CORES" --duration 20 --max-batch-size 256 --queue-limit 4096 | tee "$OUT/feed.log"
kill "$SAMPLER"

echo "== summary ($OUT)"
grep -E "^bench: (lungserve|ls-model) " "$OUT/bench.log" || true
tail -1 "$OUT/feed.log"
"$PY" - "$OUT/gpu-utilisation.csv" <<'EOF'
import statistics, sys
rows = [line.split(",") for line in open(sys.argv[1]) if line.strip()]
util = [float(r[0]) for r in rows]
if util:
    print(f"GPU utilisation: mean {statistics.mean(util):.0f}%, max {max(util):.0f}% over {len(util)} s")
EOF
