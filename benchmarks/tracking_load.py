"""Load on the team tracking server: several processes log runs at once, as a team's pipelines do.

    python benchmarks/tracking_load.py [--processes 4] [--runs 5] [--steps 20] [--metrics 5]
                                       [--params 20] [--artifacts 3] [--workers 1] [--tracking-uri URL]

Starts PostgreSQL + `mlflow server` (team.server) in a temporary folder on free 127.0.0.1 ports
(or uses --tracking-uri, e.g. a server you run yourself), then each process, through MLflow's
REST client: per run, creates it, logs --params params in one batch, --steps steps of --metrics
metrics (one request per step, as a training loop does), uploads --artifacts small files through
the artifact proxy, and ends it. Every loop is bounded. Afterwards it counts what the server holds
(runs, metric points, artifacts) so that a lost write shows. Reports runs/s, metric points/s,
request latency percentiles, and the server and PostgreSQL settings; writes
benchmarks/results/tracking_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def writer(
    uri: str,
    experiment_id: str,
    worker: int,
    runs: int,
    steps: int,
    metrics: int,
    params: int,
    artifacts: int,
    scratch: str,
) -> dict:
    """One process's share of the load: its bounded loops; returns counts and per-request seconds."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(uri)
    folder = Path(scratch) / f"worker{worker}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(artifacts):
        (folder / f"artifact_{index}.json").write_text(json.dumps({"worker": worker, "values": list(range(2000))}))
    latencies, points = [], 0
    started = time.time()
    for run_index in range(runs):
        run = client.create_run(
            experiment_id,
            run_name=f"load-w{worker}-r{run_index}",
            tags={"benchmark": "tracking_load", "worker": str(worker)},
        )
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(f"param_{i}", str(i * worker)) for i in range(params)])
        for step in range(steps):
            stamp = int(time.time() * 1000)
            batch = [Metric(f"metric_{i}", float(step * i), stamp, step) for i in range(metrics)]
            sent = time.perf_counter()
            client.log_batch(run_id, metrics=batch)
            latencies.append(time.perf_counter() - sent)
            points += metrics
        client.log_artifacts(run_id, str(folder), artifact_path="files")
        client.set_terminated(run_id)
    return {"started": started, "ended": time.time(), "runs": runs, "points": points, "latencies": latencies}


def count_stored(uri: str, experiment_id: str, metrics: int) -> dict:
    """What the server holds: runs finished, metric points, artifact files (through the REST API)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], max_results=10000)
    points = sum(len(client.get_metric_history(run.info.run_id, f"metric_{i}")) for run in runs for i in range(metrics))
    files = sum(len(client.list_artifacts(run.info.run_id, "files")) for run in runs)
    return {
        "runs": len(runs),
        "finished": sum(run.info.status == "FINISHED" for run in runs),
        "metric_points": points,
        "artifact_files": files,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5, help="runs per process")
    parser.add_argument("--steps", type=int, default=20, help="metric steps per run (one request each)")
    parser.add_argument("--metrics", type=int, default=5, help="metrics per step")
    parser.add_argument("--params", type=int, default=20)
    parser.add_argument("--artifacts", type=int, default=3, help="small files per run (about 11 KB each)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server it starts")
    parser.add_argument("--tracking-uri", help="an already running server (default: start one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tracking_load.json")
    args = parser.parse_args()
    for name in ("processes", "runs", "steps", "metrics", "params", "artifacts", "workers"):
        if not 1 <= getattr(args, name) <= 1000:
            parser.error(f"--{name} must be within 1..1000 (the loops are bounded)")

    from mlflow import MlflowClient

    from team.server import ServerConfig, cluster, load_secrets, start, stop

    scratch = tempfile.mkdtemp(prefix="tracking-load-")
    os.chmod(scratch, 0o755)  # PostgreSQL's unprivileged user (when root) must reach its folder
    config = ServerConfig(home=Path(scratch) / "server", port=free_port(), pg_port=free_port(), workers=args.workers)
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": os.getloadavg()}
    }
    try:
        if args.tracking_uri:
            uri = args.tracking_uri
            report["server"] = {"tracking_uri": uri, "started_here": False}
        else:
            started = time.perf_counter()
            state = start(config)
            uri = state["tracking_uri"]
            report["server"] = {
                "started_here": True,
                "start_seconds": round(time.perf_counter() - started, 1),
                "workers": args.workers,
                "postgres": state["postgres"],
                "artifacts_destination": "local folder (proxied by the server)",
                "postgres_settings": cluster(config, load_secrets(config.home)["postgres_password"]).settings(),
            }
        experiment_id = MlflowClient(uri).create_experiment(f"tracking-load-{int(time.time())}")
        shape = {k: getattr(args, k) for k in ("processes", "runs", "steps", "metrics", "params", "artifacts")}
        report["load"] = shape
        with ProcessPoolExecutor(args.processes) as pool:
            futures = [
                pool.submit(
                    writer,
                    uri,
                    experiment_id,
                    worker,
                    args.runs,
                    args.steps,
                    args.metrics,
                    args.params,
                    args.artifacts,
                    scratch,
                )
                for worker in range(args.processes)
            ]
            results = [future.result() for future in futures]
        # from the first process's first request to the last one's last (process start-up and imports excluded)
        wall = max(result["ended"] for result in results) - min(result["started"] for result in results)
        latencies = [value for result in results for value in result["latencies"]]
        runs = sum(result["runs"] for result in results)
        points = sum(result["points"] for result in results)
        report["result"] = {
            "wall_seconds": round(wall, 2),
            "runs": runs,
            "metric_points": points,
            "runs_per_second": round(runs / wall, 2),
            "metric_points_per_second": round(points / wall, 1),
            "metric_requests_per_second": round(len(latencies) / wall, 1),
            "metric_request_ms": {
                "p50": round(1000 * statistics.median(latencies), 1),
                "p95": round(1000 * percentile(latencies, 0.95), 1),
                "max": round(1000 * max(latencies), 1),
            },
        }
        stored = count_stored(uri, experiment_id, args.metrics)
        report["stored"] = stored
        report["nothing_lost"] = (
            stored["runs"] == stored["finished"] == runs
            and stored["metric_points"] == points
            and stored["artifact_files"] == runs * args.artifacts
        )
        report["machine"]["load_after"] = os.getloadavg()
    finally:
        if not args.tracking_uri:
            stop(config)
        shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    result = report["result"]
    print(
        f"{runs} runs, {points} metric points from {args.processes} processes in {result['wall_seconds']} s: "
        f"{result['runs_per_second']} runs/s, {result['metric_points_per_second']} metric points/s "
        f"(step request p50 {result['metric_request_ms']['p50']} ms, p95 {result['metric_request_ms']['p95']} ms); "
        f"nothing lost: {report['nothing_lost']}; -> {args.out}"
    )


if __name__ == "__main__":
    main()
