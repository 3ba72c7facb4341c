"""Look at the MLflow UI as a reviewer would: screenshots of the pages that tell one execution's story.

    python -m scripts.ui_check --out .cache/ui_check       # or: make ui-check (after `make demo`)

Starts `mlflow ui` on the pipeline's local store (127.0.0.1, a free port), opens in headless
Chromium (Debian's `chromium`) the runs page of the experiment, the latest execution's parent run,
its finetune run and that run's artifacts, and the registered model, and saves a screenshot of each.
A page fails the check when its rendered text lacks what it must show (the run and stage names, the
model name) or its screenshot is nearly blank. The server is stopped in every case. Exit status 1 when
a page fails, 2 when the check cannot run (no store, no chromium).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def browser() -> str | None:
    return next(
        (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
    )


def chromium(binary: str, url: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1600,1100",
        "--virtual-time-budget=20000",
        *args,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def blank(png: Path) -> bool:
    """Nearly one colour: the page did not render (a blank or an error-free empty shell)."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L").resize((400, 275)))
    return float((np.abs(pixels.astype(int) - int(np.median(pixels))) > 16).mean()) < 0.01


def pages(client, experiment_name: str, model_name: str) -> list[tuple[str, str, list[str]]]:
    """(file stem, URL fragment, texts the page must show) for the latest execution."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no experiment '{experiment_name}' in the store: run the pipeline first")
    eid = experiment.experiment_id
    parents = client.search_runs(
        [eid], "tags.stage = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not parents:
        raise LookupError("no pipeline execution in the store: run `dvc repro` first")
    parent = parents[0]
    finetune = parent.data.tags.get("stage.finetune")
    found = [
        ("runs", f"#/experiments/{eid}/runs", [parent.info.run_name]),
        ("execution", f"#/experiments/{eid}/runs/{parent.info.run_id}", [parent.info.run_name]),
    ]
    if finetune:
        found += [
            ("finetune", f"#/experiments/{eid}/runs/{finetune}", ["finetune"]),
            ("finetune_artifacts", f"#/experiments/{eid}/runs/{finetune}/artifacts", ["learning_curves.png"]),
        ]
    found.append(("model", f"#/models/{model_name}", [model_name, "champion"]))
    return found


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/ui_check"), help="folder for the screenshots")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)

    from mlflow import MlflowClient

    from stages.lib.core.params import load_params
    from stages.lib.core.store import tracking_uri

    binary, uri = browser(), tracking_uri()
    if binary is None:
        print("ui-check: no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    settings = load_params(args.params, timm_names=False).mlflow
    try:
        wanted = pages(MlflowClient(uri), settings.experiment, settings.registered_model)
    except LookupError as error:
        print(f"ui-check: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(args.out / "mlflow_ui.log", "w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    failures = []
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_for(base + "health", server, 120)
        for stem, fragment, texts in wanted:
            png = (args.out / f"{stem}.png").resolve()
            chromium(binary, base + fragment, f"--screenshot={png}")
            dom = chromium(binary, base + fragment, "--dump-dom").stdout
            missing = [text for text in texts if text not in dom]
            problem = (
                "no screenshot"
                if not png.is_file()
                else "blank page"
                if blank(png)
                else f"does not show {missing}"
                if missing
                else ""
            )
            print(f"{'FAIL' if problem else 'ok  '} {stem:<20} {png}  {problem}")
            if problem:
                failures.append(stem)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
