"""The `lungserve` command: serve, predict (a bulk client), and the model tools (train, evaluate,
export, upload).

The model tools need the `export` extra (TensorFlow); they are imported lazily so a
serving-only install has a working `lungserve serve` and a clear message otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


def _export_extra_missing(exc: ImportError) -> int:
    print(
        f"lungserve: this command needs the 'export' extra ({exc.name} is missing): "
        "pip install -r requirements/dev.txt  (or: make dev)",
        file=sys.stderr,
    )
    return 2


def _cmd_serve(args: argparse.Namespace) -> int:
    """Serve with uvicorn: in this process (LUNGSERVE_WORKERS=1), or as the supervisor of fronts
    (and a model process) when there are several (docs/topology.md)."""
    from pydantic import ValidationError

    from service.settings import Settings, describe_error

    flags = (("host", args.host), ("port", args.port), ("workers", args.workers))
    overrides = {k: v for k, v in flags if v is not None}
    try:
        settings = Settings(**overrides)  # LUNGSERVE_* from the environment, flags win
    except ValidationError as exc:
        print(f"lungserve serve: invalid settings:\n{describe_error(exc)}", file=sys.stderr)
        return 2
    if settings.workers > 1 or settings.inference == "model-process":
        return _serve_supervised(settings, overrides)  # before the app is imported: see there
    return _serve_here(settings)


def _serve_here(settings: Settings) -> int:
    """One process: the app on uvicorn, with the model in it."""
    import signal

    from service.app import GrpcUnavailable, create_app
    from service.http.access import ApiKeysFileError
    from service.http.server import build_server
    from service.observability.logs import configure_logging

    try:
        app = create_app(settings)  # reads LUNGSERVE_API_KEYS_FILE, checks the grpc extra
    except (ApiKeysFileError, GrpcUnavailable) as exc:
        print(f"lungserve serve: {exc}", file=sys.stderr)
        return 2
    # JSON lines on stderr (LUNGSERVE_LOG_JSON, LUNGSERVE_LOG_LEVEL) for ours and uvicorn's
    # loggers; uvicorn's own access log is off: RequestContextMiddleware writes one per request.
    configure_logging(settings.log_level, json=settings.log_json)
    logging.getLogger("service.cli").info(
        "serving %s on http://%s:%d with 1 uvicorn worker (one process = one model, one batch queue)",
        settings.model_uri,
        settings.host,
        settings.port,
    )
    # Connection guards, timeouts and the shutdown order: service/http/server.py.
    server, sockets = build_server(app, settings)

    # uvicorn handles SIGTERM/SIGINT itself while it serves (graceful shutdown), then restores
    # the handler it found and raises the signal again: finding this one, the process exits 0.
    graceful = server.handle_exit_outside_serve
    previous = {sig: signal.signal(sig, graceful) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=sockets)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        print("lungserve serve: start-up failed (see the log above)", file=sys.stderr)
        return 3
    return 0


def _serve_supervised(settings: Settings, overrides: dict[str, object]) -> int:
    """Several processes (docs/topology.md): a supervisor, N fronts, maybe one model process.

    This process checks the settings and binds the sockets, then becomes the supervisor by
    exec (service.processes.supervisor, same pid): the supervisor needs none of what was
    imported to get here (pydantic, numpy; ONNX Runtime when `auto` asked it about CUDA).
    """
    import os

    from service.core.supervisor import listen, listen_each, remote_inference
    from service.http.server import graceful_timeout_s
    from service.observability.logs import configure_logging
    from service.settings import env_name

    configure_logging(settings.log_level, json=settings.log_json)
    for name, value in overrides.items():  # the children read their settings from the environment
        os.environ[env_name(name)] = str(value)
    remote = remote_inference(settings)
    public = listen_each(settings.host, settings.port, settings.workers)
    shared = [listen(settings.host, settings.admin_port)] if settings.admin_port is not None else []
    logging.getLogger("service.cli").info(
        "serving %s on http://%s:%d with %d front process(es) and %s",
        settings.model_uri,
        settings.host,
        settings.port,
        settings.workers,
        "one model process" if remote else "a model in each front",
        extra={"workers": settings.workers, "inference": "model-process" if remote else "in-front"},
    )
    # Above what a front's ordered shutdown can take (service.http.server), plus the model's drain.
    stop_timeout_s = settings.shutdown_delay_s + graceful_timeout_s(
        settings.drain_timeout_s, settings.request_deadline_s
    )
    stop_timeout_s += settings.drain_timeout_s + 30.0
    argv = [sys.executable, "-m", "service.processes.supervisor", "--workers", str(settings.workers)]
    argv += ["--stop-timeout", str(stop_timeout_s), "--log-level", settings.log_level]
    argv += [arg for sock in public for arg in ("--public-fd", str(sock.fileno()))]
    argv += [arg for sock in shared for arg in ("--shared-fd", str(sock.fileno()))]
    argv += ["--model-process"] if remote else []
    argv += ["--log-json"] if settings.log_json else []
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)  # the sockets are inheritable (listen); returns only by raising


def _cmd_predict(args: argparse.Namespace) -> int:
    """Classify files and folders into CSV/JSONL; exit 1 if any file failed, 2 if the run could not."""
    import asyncio

    from service.clients.bulk import RunOptions, UsageError, run
    from service.clients.http_client import RetryPolicy

    # The summary and the progress bar are the output; per-request INFO lines would drown them.
    logging.getLogger().setLevel(logging.WARNING)

    options = RunOptions(
        url=args.url,
        local=args.local,
        concurrency=args.concurrency,
        api_key=args.api_key,
        progress=not args.no_progress,
        retry=RetryPolicy(max_attempts=args.max_attempts),
    )
    try:
        summary = asyncio.run(run(args.paths, args.out, options))
    except UsageError as exc:
        print(f"lungserve predict: {exc}", file=sys.stderr)
        return 2
    print(summary.text(args.out), file=sys.stderr)
    return 1 if summary.failed else 0


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        from export.train import TrainConfig, train
    except ImportError as exc:
        return _export_extra_missing(exc)
    cfg = TrainConfig(
        data=args.data,
        out=args.out,
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        val_fraction=args.val_fraction,
        cache_dir=args.cache_dir,
        allow_image_split=args.allow_image_split,
        max_steps=args.max_steps,
        split_from=args.split_from,
        resume=args.resume,
        ema_decay=args.ema_decay,
    )
    train(cfg)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    try:
        from export.evaluate import evaluate
    except ImportError as exc:
        return _export_extra_missing(exc)
    if args.split is not None:
        from export.evaluate import evaluate_part

        model_dir = args.model if args.model.is_dir() else args.model.parent
        part = evaluate_part(model_dir, args.data, args.split, split_manifest=args.split_from, cache_dir=args.cache_dir)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"evaluation-{args.split}.json").write_text(json.dumps(part, indent=1))
        print(json.dumps({k: part[k] for k in ("part", "model", "n", "groups", "accuracy", "ece", "ci95")}))
        if "decision" in part:
            print(json.dumps({"decision": part["decision"]}))
        return 0
    report = evaluate(
        args.model, args.data, args.out, validation_groups_only=args.validation_groups, cache_dir=args.cache_dir
    )
    print(json.dumps({k: report[k] for k in ("subset", "n", "accuracy", "balanced_accuracy", "ece")}))
    for name, m in report["per_class"].items():
        print(
            f"{name:>10}  precision {m['precision']:.4f}  recall {m['recall']:.4f}  f1 {m['f1']:.4f}  n={m['support']}"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from export.convert import export, parity_images_from_dir
        from export.model import build_model  # noqa: F401  (fails early without TensorFlow)
    except ImportError as exc:
        return _export_extra_missing(exc)
    images = None
    if args.parity_images is not None:
        import keras

        size = int(keras.models.load_model(args.keras).input_shape[1])
        images = parity_images_from_dir(args.parity_images, size)
    if args.run is not None:
        from export.bundle import bundle

        manifest = bundle(
            args.run,
            args.out,
            data=args.data,
            cache_dir=args.cache_dir,
            weights=args.weights,
            version=args.version,
            docs=args.docs,
        )
        print(f"wrote {args.out}/model.onnx and model.json: version {manifest.version}, sha256 {manifest.sha256}")
        return 0
    if args.keras is None:
        print("lungserve export: pass --run RUN (model v2) or --keras FILE", file=sys.stderr)
        return 2
    manifest = export(args.keras, args.out, parity_images=images, version=args.version)
    print(f"wrote {args.out}/model.onnx and model.json: version {manifest.version}, sha256 {manifest.sha256}")
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    # Lazy: keeps `lungserve --help` fast; needs only aioboto3, so it works in a serving install.
    import asyncio

    from export.upload import upload
    from service.errors import ModelSourceError
    from service.model.source import S3Options

    s3 = S3Options(endpoint_url=args.endpoint_url, region=args.region)
    try:
        uris = asyncio.run(upload(args.dir, args.uri, s3=s3, create_bucket=args.create_bucket))
    except ModelSourceError as exc:
        print(f"lungserve upload: {exc}", file=sys.stderr)
        return 1
    for uri in uris:
        print(f"uploaded {uri}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import os

    from service import __version__
    from service.settings import describe_settings

    parser = argparse.ArgumentParser(prog="lungserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lungserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve",
        help="serve the model over HTTP (settings: LUNGSERVE_* environment variables)",
        description=(
            "Serve the model over HTTP: one front process per CPU this process may use (LUNGSERVE_WORKERS, "
            "--workers; 1: one process, docs/topology.md). Every setting is an environment variable."
        ),
        epilog="settings (environment variables):\n" + describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1, or LUNGSERVE_HOST)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000, or LUNGSERVE_PORT)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="front processes (default: the usable CPUs, or LUNGSERVE_WORKERS; 1: one process)",
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "predict",
        help="classify image files and folders into a CSV or JSONL file (resumable)",
        description=(
            "Classify images with a lungserve server (or --local: in this process). Folders are walked "
            "for .jpg/.jpeg/.png/.tif/.tiff/.bmp files; requests fit the server's limits (GET /model); "
            "503 answers are retried after Retry-After. Re-running the same command skips files that "
            "already have a successful row in --out. Exit status: 0 all classified, 1 some file "
            "failed (see its error column), 2 the run could not start."
        ),
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files and folders")
    p.add_argument("--out", type=Path, required=True, help="result file: .csv or .jsonl")
    p.add_argument(
        "--url",
        default=os.environ.get("LUNGSERVE_URL", "http://127.0.0.1:8000"),
        help="server URL (default: $LUNGSERVE_URL or http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--local", action="store_true", help="no server: run the service in this process (LUNGSERVE_* settings)"
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument(
        "--api-key", default=os.environ.get("LUNGSERVE_API_KEY"), help="API key (default: $LUNGSERVE_API_KEY)"
    )
    p.add_argument(
        "--max-attempts", type=int, default=8, help="tries per request when the server sheds load (default 8)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("train", help="train the CNN on a folder-per-class image set, split by group")
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class (+ groups.csv)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, report, plots")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=22)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of each class's groups held out, then halved into select and test",
    )
    p.add_argument(
        "--split-from",
        type=Path,
        default=None,
        help="hold out the `validation_groups` of this model.json instead (keeps that model comparable)",
    )
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--cache-dir", type=Path, default=None, help="decoded-array cache (default: OUT/cache)")
    p.add_argument(
        "--allow-image-split",
        action="store_true",
        help="permit an image-level split when there is no groups.csv (leaks near-copies)",
    )
    p.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class metrics, confusion matrix, ECE, plots")
    p.add_argument("--model", type=Path, required=True, help="model.onnx (with model.json beside it) or a .keras file")
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class")
    p.add_argument("--out", type=Path, default=None, help="write evaluation.json and PNG plots here")
    p.add_argument(
        "--split",
        choices=("select", "test"),
        default=None,
        help="one part of the 3-way group split, with group-bootstrap 95%% intervals",
    )
    p.add_argument(
        "--split-from",
        type=Path,
        default=None,
        help="model.json whose split to use (default: the model's own; judges models on the same groups)",
    )
    p.add_argument(
        "--validation-groups",
        action="store_true",
        help="only the tissue groups the model was validated on (from its manifest)",
    )
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="convert a Keras checkpoint to ONNX + model.json, with a parity check")
    p.add_argument("--keras", type=Path, default=None, help="a single-output checkpoint, e.g. RUN/calibrated.keras")
    p.add_argument(
        "--run",
        type=Path,
        default=None,
        help="a `lungserve train` run folder: the full v2 graph (ood_score, feature_maps, cam_weights) "
        "+ decision fitted on the select groups",
    )
    p.add_argument(
        "--weights",
        choices=("best", "ema", "online"),
        default="best",
        help="with --run: best EMA checkpoint on select (default), latest EMA, or latest raw weights",
    )
    p.add_argument("--data", type=Path, default=None, help="with --run: data folder (default: the run's)")
    p.add_argument("--cache-dir", type=Path, default=None, help="with --run: decoded-array cache")
    p.add_argument("--docs", type=Path, default=None, help="with --run: write risk_coverage.png here")
    p.add_argument("--out", type=Path, required=True, help="folder for model.onnx and model.json")
    p.add_argument(
        "--parity-images",
        type=Path,
        default=None,
        help="folder of real images (default: RUN/parity_images.npy written by train)",
    )
    p.add_argument("--version", default=None, help="default: DATE-<checkpoint sha256 prefix>")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("upload", help="put model.onnx + model.json under an S3 prefix (model first, manifest last)")
    p.add_argument("dir", type=Path, help="folder with model.json and the ONNX file it names")
    p.add_argument("uri", help="s3://bucket/prefix/")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph, moto); default AWS")
    p.add_argument("--region", default=None, help="default: the AWS chain's region (AWS_REGION, profile)")
    p.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    p.set_defaults(func=_cmd_upload)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
