"""The README's commands work verbatim, as a new user pastes them into a fresh shell.

The cheap commands of the README's `bash` blocks run in a copy of the tiny pipeline (a complete demo state with
its MLflow store), each in a fresh `bash` whose PATH holds no project environment until the README's own
`source .venv/bin/activate` line; the REST example runs against the README's own serving command. The README
cites only files that exist. tests/test_docs.py applies the same checks to the pages of docs/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, REPO

README = (REPO / "README.md").read_text()
CHEAP = (
    "dvc exp show",
    "dvc metrics diff",
    "dvc params diff",
    "dvc plots diff",
    "dvc plots show",
    "make help",
    "make summary",
    "python -m stages.predict",
    "python -m stages.demo_data --kind letters",  # a few seconds: the foreign images docs/unknown.md predicts
)


CITED = r"`((?:stages|scripts|tests|benchmarks|ci|team)/[\w./-]+\.(?:py|csv|json|md))`"


def commands(text: str = README) -> list[str]:
    """Every command line of the bash blocks of `text`, the README by default (continuations joined, comments
    dropped)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"\s+#\s.*$", "", command).strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


def fresh_shell(project: Path, command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`command` in a new bash, after the README's activation line; PATH has no project environment before it.
    `.venv` in the project is a link to this test's environment (what `make install` would create)."""
    env = {
        "HOME": os.environ.get("HOME", "/root"),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "GX_ANALYTICS_ENABLED": "false",
        "PYTHONWARNINGS": "ignore",
    }
    return subprocess.run(
        ["bash", "-c", f"source .venv/bin/activate && {command}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo(tiny_pipeline, tmp_path_factory) -> Path:
    project = Path(shutil.copytree(tiny_pipeline, tmp_path_factory.mktemp("readme") / "project", symlinks=True))
    (project / ".venv").symlink_to(BIN.parent)
    shutil.copy2(REPO / "Makefile", project / "Makefile")
    return project


def test_the_readme_activates_the_environment_once():
    assert "source .venv/bin/activate" in commands()
    assert not [c for c in commands() if ".venv/bin/" in c and not c.startswith("source")], (
        "one convention: commands assume the activated environment"
    )


def run_cheap(project: Path, command: str) -> None:
    """A cheap command, verbatim, in a fresh shell in `project`: it succeeds without a traceback."""
    if command.startswith("make "):  # the venv exists: make must not try to install
        command = command.replace("make ", f"make -o {BIN.parent}/.installed VENV={BIN.parent} ", 1)
    result = fresh_shell(project, command)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [c for c in commands() if c.startswith(CHEAP)])
def test_a_cheap_readme_command_works_verbatim(demo, command):
    run_cheap(demo, command)


def test_the_serving_example_answers(demo):
    serve = next(c for c in commands() if "mlflow models serve" in c)
    request = next(c for c in commands() if c.startswith("curl"))
    check_serving(demo, serve, request)


def check_serving(demo: Path, serve: str, request: str) -> None:
    """`serve` (a `mlflow models serve ... -p PORT` line) answers `request` (a curl line) with one digit."""
    serve = serve.removesuffix("&").strip()
    port = re.search(r"-p (\d+)", serve).group(1)
    log = open(demo / "serve.log", "w")
    server = subprocess.Popen(
        ["bash", "-c", f"source .venv/bin/activate && {serve}"],
        cwd=demo,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")},
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (demo / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the README's server did not answer in 240 s"
                time.sleep(1)
        result = fresh_shell(demo, request)
        [row] = json.loads(result.stdout)["predictions"]
        assert row["error"] == "" and row["label"] in [str(digit) for digit in range(10)]
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:  # it had stopped by itself
            pass
        server.wait(timeout=30)
        log.close()


def test_forgetting_to_activate_gives_one_line_saying_what_to_do(demo):
    """A stage started by another Python (the system's, first on PATH) stops with one line, no traceback."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None or subprocess.run([python, "-c", "import pandas, mlflow"], capture_output=True).returncode == 0:
        pytest.skip("no system Python without the project's packages here")
    result = subprocess.run([python, "-m", "stages.split", "--help"], cwd=demo, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "source .venv/bin/activate" in result.stderr


def test_the_readme_cites_only_files_that_exist():
    cited = set(re.findall(CITED, README))
    missing = sorted(path for path in cited if not (REPO / path).exists())
    assert not missing
