"""team.sweep without a cluster: the override grammar, the objective, the reports, and every refusal of
`check_prerequisites` on real git repositories (a bare `origin`, dvc config, a local HTTP server
answering /health as the tracking server does). The cluster itself: tests/test_cluster.py."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from team import TeamError
from team.driver import Sweep
from team.overrides import Objective, grid, search_space, split_top_level, trial_name
from team.refusals import check_prerequisites, check_tracking_uri
from team.reports import write_reports
from team.results import TrialResult, best

BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------ overrides
def test_comma_lists_make_a_grid_in_hydras_order():
    trials = grid(["finetune.phases.1.lr=3e-4,1e-3", "base.seed=42,1,2"])
    assert len(trials) == 6
    assert trials[:3] == [{"finetune.phases.1.lr": "3e-4", "base.seed": s} for s in ("42", "1", "2")]
    assert grid(["base.seed=42"]) == [{"base.seed": "42"}]


def test_commas_inside_brackets_and_quotes_do_not_split():
    assert split_top_level("[0.9,1.1],[0.8,1.2]") == ["[0.9,1.1]", "[0.8,1.2]"]
    assert split_top_level("'a,b',c") == ["'a,b'", "c"]
    assert grid(["augment.scale=[0.9,1.1]"]) == [{"augment.scale": "[0.9,1.1]"}]
    with pytest.raises(TeamError, match="unbalanced"):
        split_top_level("[0.9,1.1")


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.phases.1.lr", "write key=value"),
        ("=3", "write key=value"),
        ("finetune.phases.1.lr=loguniform(1e-4,1e-2)", "needs --search optuna"),
    ],
)
def test_bad_overrides_are_refused_in_one_line(override, message):
    with pytest.raises(TeamError, match=message):
        grid([override])


def test_a_search_space_of_distributions_choices_and_fixed_values():
    import optuna

    space = search_space(
        [
            "finetune.phases.1.lr=loguniform(1e-4,1e-2)",
            "base.seed=42,1",
            "finetune.batch_size=32",
            "augment.rotation=int(0,20)",
            "model.drop_rate=uniform(0.1,0.3)",
        ]
    )
    assert [d.kind for d in space] == ["loguniform", "choice", "fixed", "int", "uniform"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    values = {d.key: d.suggest(trial) for d in space}
    assert 1e-4 <= float(values["finetune.phases.1.lr"]) <= 1e-2 and values["base.seed"] in ("42", "1")
    assert values["finetune.batch_size"] == "32" and 0 <= int(values["augment.rotation"]) <= 20
    with pytest.raises(TeamError, match="low < high and low > 0"):
        search_space(["finetune.phases.1.lr=loguniform(0,1)"])


def test_the_objective_must_be_a_val_metric():
    objective = Objective.parse("metrics/evaluate.json:finetuned.val.accuracy")
    assert objective.value('{"finetuned": {"val": {"accuracy": 0.75}, "test": {"accuracy": 0.7}}}') == 0.75
    assert Objective.parse("metrics/finetune.json:kept_val_loss", "min").better(0.1, 0.2)
    for test_metric in (
        "metrics/evaluate.json:finetuned.test.accuracy",
        "metrics/evaluate.json:baseline.test.macro_f1",
    ):
        with pytest.raises(TeamError, match="is a test metric: choose on a val metric"):
            Objective.parse(test_metric)
    with pytest.raises(TeamError, match="write FILE:KEY"):
        Objective.parse("val_accuracy")


def test_trial_names_sort_in_trial_order():
    assert [trial_name("lr", i, 12) for i in (1, 2, 12)] == ["lr-01", "lr-02", "lr-12"]
    assert trial_name("lr", 7, 150) == "lr-007"


def test_the_reports_list_every_trial_and_the_best_by_the_objective(tmp_path):
    objective = Objective.parse("metrics/evaluate.json:finetuned.val.accuracy")
    sweep = Sweep(name="lr", overrides=[], objective=objective)
    results = [
        TrialResult("lr-01", {"a": "1"}, status="ok", objective=0.5, node="n1", duration_s=3.0),
        TrialResult("lr-02", {"a": "2"}, status="exists", objective=0.9),
        TrialResult("lr-03", {"a": "3"}, node="n2", duration_s=1.0, error="dvc exp run failed (1): ERROR: boom"),
    ]
    assert best(results, objective).name == "lr-02"
    csv_path, md_path = write_reports(sweep.name, sweep.search, sweep.objective, results, tmp_path)
    assert (
        csv_path.read_text().splitlines()[0]
        == "trial,a,metrics/evaluate.json:finetuned.val.accuracy,status,node,duration_s,error"
    )
    report = md_path.read_text()
    assert "**Best trial: `lr-02`**" in report and "2 finished, 1 failed" in report and "ERROR: boom" in report


# --------------------------------------------------------------------------------- prerequisites
@pytest.fixture(scope="module")
def tracking_server():
    """A local HTTP server answering /health with 200, as an MLflow server does."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def dvc(repo: Path, *args: str) -> None:
    subprocess.run([str(BIN / "dvc"), *args], cwd=repo, check=True, capture_output=True, text=True)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A committed git + DVC repository (no remotes yet)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    dvc(repo, "init", "-q")
    (repo / "params.yaml").write_text("base:\n  seed: 42\nmlflow:\n  experiment: sweep-test\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "start")
    return repo


def add_remotes(repo: Path, tmp_path: Path, push: bool = True) -> None:
    git(tmp_path, "init", "-q", "--bare", str(tmp_path / "origin.git"))
    git(repo, "remote", "add", "origin", str(tmp_path / "origin.git"))
    dvc(repo, "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote"))
    git(repo, "commit", "-qam", "dvc remote")
    if push:
        git(repo, "push", "-q", "origin", "HEAD:main")


def test_refusals_name_what_to_set_in_order(repo, tmp_path, tracking_server):
    env = {"MLFLOW_TRACKING_URI": tracking_server}
    with pytest.raises(TeamError, match="no git remote 'origin'"):
        check_prerequisites(repo, env)
    git(tmp_path, "init", "-q", "--bare", str(tmp_path / "origin.git"))
    git(repo, "remote", "add", "origin", str(tmp_path / "origin.git"))
    with pytest.raises(TeamError, match="no default DVC remote in the committed .dvc/config"):
        check_prerequisites(repo, env)
    dvc(repo, "remote", "add", "--local", "-d", "mine", str(tmp_path / "dvc-remote"))  # clones would not see it
    with pytest.raises(TeamError, match="no default DVC remote in the committed .dvc/config"):
        check_prerequisites(repo, env)
    dvc(repo, "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote"))
    git(repo, "commit", "-qam", "dvc remote")
    for uri, message in (
        (None, "MLFLOW_TRACKING_URI is not set"),
        ("sqlite:///mlflow.db", "is a local store"),
        ("file:///tmp/mlruns", "is a local store"),
        ("/tmp/mlruns", "is a local store"),
        ("http://127.0.0.1:9", "does not answer"),
    ):
        with pytest.raises(TeamError, match=message):
            check_prerequisites(repo, {"MLFLOW_TRACKING_URI": uri} if uri else {})
    (repo / "params.yaml").write_text("base:\n  seed: 1\n")
    with pytest.raises(TeamError, match="uncommitted changes .*params.yaml"):
        check_prerequisites(repo, env)
    git(repo, "checkout", "-q", "params.yaml")
    (repo / "new_stage.py").write_text("")  # untracked, not ignored: the clone would lack it
    with pytest.raises(TeamError, match="uncommitted changes"):
        check_prerequisites(repo, env)
    (repo / "new_stage.py").unlink()
    (repo / "reports/sweeps").mkdir(parents=True)
    (repo / "reports/sweeps/earlier.md").write_text("")  # a sweep's own report does not count
    with pytest.raises(TeamError, match="is not on origin: push it first"):
        check_prerequisites(repo, env)
    git(repo, "push", "-q", "origin", "HEAD:main")
    found = check_prerequisites(repo, env)
    assert found.remote == str(tmp_path / "origin.git") and found.commit == git(repo, "rev-parse", "HEAD").strip()
    assert found.tracking_uri == tracking_server and found.experiment == "sweep-test"


def test_a_tracking_server_that_answers_is_accepted(tracking_server):
    assert check_tracking_uri(tracking_server) == tracking_server


def test_the_cluster_refuses_to_listen_on_the_network(monkeypatch):
    from team import cluster

    monkeypatch.setattr(cluster, "outward_address", lambda: "192.0.2.2")
    with pytest.raises(TeamError, match="Ray would listen on 192.0.2.2 .*unshare -n"):
        cluster.check_loopback_only()
    cluster.check_loopback_only(allow_network=True)
    monkeypatch.setattr(cluster, "outward_address", lambda: None)  # a loopback-only namespace
    cluster.check_loopback_only()


# ------------------------------------------------------------------------ Optuna's ask/tell loop
class FakeRunner:
    """Runs a trial synchronously where the real Runner submits a Ray task: the objective is highest at lr=1e-3;
    a trial already on origin comes back `exists`, as run_trial reports it."""

    existing: set = set()

    def __init__(self, sweep, nodes):
        self.pending, self.limit, self.ran = [], 2, []

    def submit(self, spec, tag=None):
        self.pending.append((spec, tag))

    @property
    def full(self):
        return len(self.pending) >= self.limit

    def next_result(self):
        import math

        spec, tag = self.pending.pop(0)
        exists = spec["name"] in FakeRunner.existing
        lr = float(spec["params"]["finetune.phases.1.lr"])
        return TrialResult(
            spec["name"],
            spec["params"],
            status="exists" if exists else "ok",
            objective=None if exists else -abs(math.log10(lr) + 3),
            node="n",
            duration_s=1.0,
        ), tag


def test_an_optuna_search_asks_tells_and_resumes_a_killed_drivers_study(tmp_path, monkeypatch):
    import optuna

    from team.driver import run_optuna
    from team.refusals import Prerequisites

    monkeypatch.setattr(FakeRunner, "existing", set())
    monkeypatch.setattr(Sweep, "existing", lambda sweep, pre: set(FakeRunner.existing))
    monkeypatch.setattr(Sweep, "objective_of", lambda sweep, pre, name: -0.5)
    monkeypatch.setenv("TEAM_HOME", str(tmp_path / "team"))
    objective = Objective.parse("metrics/evaluate.json:finetuned.val.accuracy")
    pre = Prerequisites(remote="origin", commit="ab" * 20, tracking_uri="http://127.0.0.1:1")
    sweep = Sweep(
        name="tpe",
        overrides=["finetune.phases.1.lr=loguniform(1e-4,1e-2)"],
        objective=objective,
        search="optuna",
        trials=3,
        repo=tmp_path,
    )
    results = run_optuna(sweep, pre, FakeRunner(sweep, {}))
    assert [r.name for r in results] == ["tpe-01", "tpe-02", "tpe-03"] and all(r.status == "ok" for r in results)

    # a driver killed with two trials in flight: tpe-04 had reached origin, tpe-05 had not
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "team/sweeps/tpe.optuna.log"))
    )
    study = optuna.load_study(study_name=f"tpe@{pre.commit}", storage=storage)
    for name in ("tpe-04", "tpe-05"):
        trial = study.ask()
        trial.suggest_float("finetune.phases.1.lr", 1e-4, 1e-2, log=True)
        trial.set_user_attr("name", name)
    monkeypatch.setattr(FakeRunner, "existing", {"tpe-04"})
    sweep.trials = 5
    results = run_optuna(sweep, pre, FakeRunner(sweep, {}))
    names = [r.name for r in results]
    assert names[:3] == ["tpe-01", "tpe-02", "tpe-03"] and len(results) == 5, names
    assert "tpe-04" in names and "tpe-05" not in names  # on origin: reported; lost: asked again as a new trial
    found = next(r for r in results if r.name == "tpe-04")
    assert found.status == "exists" and found.objective == -0.5  # its value read from origin's ref
    assert best(results, objective).status == "ok"


def test_a_failed_commands_output_becomes_one_telling_line():
    from team.trial import _last_line

    output = (
        "Running stage 'finetune':\n> python -m stages.finetune\nerror: params.yaml is invalid:\n"
        "  finetune.phases.1.lr: Input should be greater than 0 [got -1.0]\n"
        "ERROR: failed to reproduce 'finetune': failed to run: python -m stages.finetune, exited with 1\n"
    )
    assert _last_line(output) == (
        "error: params.yaml is invalid: finetune.phases.1.lr: Input should be greater than 0 [got -1.0]"
    )
    assert _last_line("Cloning...\nfatal: repository '/x' does not exist\n") == "fatal: repository '/x' does not exist"
    assert _last_line("") == "(no output)"


# ------------------------------------------------------------------------------ on one machine
def test_a_command_killed_by_a_signal_is_retryable_one_that_fails_is_not(tmp_path):
    from team.trial import TrialFailed, TrialKilled, _run

    env = {"PATH": "/usr/bin:/bin"}
    with pytest.raises(TrialKilled, match=r"dvc exp run was killed \(signal 9\)"):
        _run(["bash", "-c", "kill -9 $$"], tmp_path, env, tmp_path, "dvc exp run", 30)
    stage_killed = "echo 'ERROR: failed to run: python -m stages.finetune, exited with -9'; exit 255"
    with pytest.raises(TrialKilled, match="exited with -9"):  # a stage ended by the OOM killer, as DVC says it
        _run(["bash", "-c", stage_killed], tmp_path, env, tmp_path, "dvc exp run", 30)
    with pytest.raises(TrialFailed) as failed:
        _run(["bash", "-c", "echo 'error: bad lr'; exit 1"], tmp_path, env, tmp_path, "dvc exp run", 30)
    assert not isinstance(failed.value, TrialKilled) and "failed (1): error: bad lr" in str(failed.value)


def test_one_machine_refuses_more_than_it_has_and_leases_its_gpus():
    from team.local import LocalRunner
    from team.refusals import check_machine

    with pytest.raises(TeamError, match="asks 4 CPUs but this machine has 2"):
        check_machine(4, 0, cores=2, devices=0)
    with pytest.raises(TeamError, match="asks 1 GPUs but this machine has 0"):
        check_machine(1, 1, cores=2, devices=0)
    check_machine(1, 2, cores=2, devices=2)

    def leases(gpus: float, devices: list[str]) -> list[str]:
        """The devices each trial gets until the runner is full (no trial is run)."""
        runner = LocalRunner(Sweep(name="s", overrides=[], gpus=gpus, cpus=1), 8, devices)
        given = []
        while not runner.full:
            taken = runner.take()
            runner.pending[len(given)] = ({}, None, taken)
            given.append(",".join(taken))
        runner.pool.shutdown()
        return given

    assert leases(1, ["0", "1"]) == ["0", "1"]  # one GPU each, two at once: as Ray gives them
    assert leases(2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert leases(0.5, ["0"]) == ["0", "0"]  # a fraction shares a device
    assert LocalRunner(Sweep(name="s", overrides=[], cpus=1), 2, []).limit == 2  # cores / --cpus
