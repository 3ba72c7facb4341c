"""What every stage (and predict) does first."""

import atexit
import gc
import logging
import os
import sys

from stages.lib.core import threads
from stages.lib.core.errors import report_pipeline_errors


def setup_stage() -> None:
    """Concise logs, quiet third-party chatter, PipelineErrors without a traceback, this process's CPU
    thread budget (`threads.apply`: `PIPELINE_THREADS`, or the cores shared by the live `dvc queue`
    workers), and a quick exit: once the exit handlers have run (MLflow's included), the interpreter's
    final garbage collection is skipped over the objects torch, scikit-learn and MLflow leave behind."""
    atexit.register(gc.freeze)  # exit handlers registered later (MLflow's) run before it
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "great_expectations", "PIL", "matplotlib", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    sys.excepthook = report_pipeline_errors
    threads.apply()
