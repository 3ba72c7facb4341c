"""The project's error type and how a stage reports errors: one line, no traceback, for problems with
the user's data, params or environment."""

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
    return (
        f"the MLflow tracking server {found.group(1)} stopped answering "
        f"({reason.group(0) if reason else 'no connection'}): this stage's run is left unfinished "
        "and DVC records nothing. Restart the server, then run `dvc repro` again."
    )


def report_pipeline_errors(kind, error, traceback):
    if issubclass(kind, PipelineError):
        print(f"error: {error}", file=sys.stderr)
    elif lost_tracking_server(error):
        print(f"error: {lost_tracking_server(error)}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)
