"""Shared pieces of the stages, one module per concern."""

import logging
import os


def setup_logging() -> None:
    """Concise stage logs: `stage: message`, quiet third-party chatter."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "great_expectations", "PIL", "matplotlib", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
