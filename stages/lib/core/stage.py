"""What every stage (and predict) does first."""

import atexit
import gc
import logging
import os
import sys

from stages.lib.core import gpus, threads
from stages.lib.core.errors import report_pipeline_errors


def setup_stage(gpu: bool = False) -> None:
    """Concise logs, quiet third-party chatter, PipelineErrors without a traceback, this process's CPU
    thread budget (`threads.apply`: `PIPELINE_THREADS`, or the cores shared by the live `dvc queue`
    workers), and a quick exit: once the exit handlers have run (MLflow's included), the interpreter's
    final garbage collection is skipped over the objects torch, scikit-learn and MLflow leave behind.

    gpu: the stage may use CUDA. On a machine with several GPUs it leases one (`gpus.lease`: a free
    device, held until the process ends) unless `CUDA_VISIBLE_DEVICES` is set or torchrun places the
    processes itself, so that parallel queue workers each get their own."""
    atexit.register(gc.freeze)  # exit handlers registered later (MLflow's) run before it
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "great_expectations", "PIL", "matplotlib", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    sys.excepthook = report_pipeline_errors
    if gpu and "LOCAL_WORLD_SIZE" not in os.environ:
        gpus.lease()
    threads.apply()
