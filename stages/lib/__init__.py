"""Shared pieces of the stages, one module per concern."""

import logging
import os
import sys


class PipelineError(Exception):
    """A problem with the user's data, params or environment: reported as one clear line."""


def _report_pipeline_errors(kind, error, traceback):
    if issubclass(kind, PipelineError):
        print(f"error: {error}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


def setup_logging() -> None:
    """Concise stage logs, quiet third-party chatter, PipelineErrors without a traceback, and this
    process's CPU thread budget (stages/lib/threads.py: `PIPELINE_THREADS`, or the cores shared by
    the live `dvc queue` workers)."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "great_expectations", "PIL", "matplotlib", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    sys.excepthook = _report_pipeline_errors
    from stages.lib import threads  # imports stages.lib: not at the top

    threads.apply()
