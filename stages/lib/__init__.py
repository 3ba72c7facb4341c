"""Shared pieces of the stages, one module per concern."""

import atexit
import gc
import logging
import os
import re
import sys


class PipelineError(Exception):
    """A problem with the user's data, params or environment: reported as one clear line."""


def lost_tracking_server(error: BaseException) -> str | None:
    """A one-line account when an MLflow REST call found no server (it stopped mid-stage), else None."""
    found = re.match(r"API request to (\S+?)/api/\S* failed with exception (.*)", str(error), re.DOTALL)
    if type(error).__name__ != "MlflowException" or not found:
        return None
    reason = re.search(r"\[Errno -?\d+\] [^\"')]+|Read timed out|Connection aborted", found.group(2))
    return (f"the MLflow tracking server {found.group(1)} stopped answering "
            f"({reason.group(0) if reason else 'no connection'}): this stage's run is left unfinished "
            "and DVC records nothing. Restart the server, then run `dvc repro` again.")


def _report_pipeline_errors(kind, error, traceback):
    if issubclass(kind, PipelineError):
        print(f"error: {error}", file=sys.stderr)
    elif lost_tracking_server(error):
        print(f"error: {lost_tracking_server(error)}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


def setup_stage() -> None:
    """What every stage (and predict) does first: concise logs, quiet third-party chatter,
    PipelineErrors without a traceback, this process's CPU thread budget (stages/lib/threads.py:
    `PIPELINE_THREADS`, or the cores shared by the live `dvc queue` workers), and a quick exit: once
    the exit handlers have run (MLflow's included), the interpreter's final garbage collection skips
    the millions of objects torch, scikit-learn and MLflow leave behind (0.4-0.7 s per stage process
    here)."""
    atexit.register(gc.freeze)  # exit handlers registered later (MLflow's) run before it
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "great_expectations", "PIL", "matplotlib", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    sys.excepthook = _report_pipeline_errors
    from stages.lib import threads  # imports stages.lib: not at the top

    threads.apply()
