"""The champion: the registered version that carries the @champion alias, and its evaluation's per-image
predictions (the MLflow artifact `evaluation/predictions.csv` of the evaluate run tagged on the version),
as evaluate (the promotion evidence) and the gate (its default reference) fetch them."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.lib.core.params import Gate
from stages.lib.core.store import tracking_uri
from stages.lib.registry.aliases import CHAMPION

log = logging.getLogger(__name__)

PREDICTIONS_ARTIFACT = "evaluation/predictions.csv"


def version_with_alias(client, name: str, alias: str = CHAMPION):
    """The `ModelVersion` holding `alias` of registered model `name`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def evaluation_predictions(run_id: str, scratch: Path | None = None) -> Path:
    """A local copy of the predictions file logged by evaluate run `run_id` (in `scratch` when given)."""
    import mlflow

    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=PREDICTIONS_ARTIFACT, dst_path=str(scratch) if scratch else None
        )
    )


def champion_predictions(
    client, name: str, scratch: Path | None = None, alias: str = CHAMPION
) -> tuple[Path, str, str] | None:
    """(local predictions file, a name for reports, version) of the version holding `alias`, when it has
    an evaluation; else None."""
    version = version_with_alias(client, name, alias)
    run_id = (version.tags or {}).get("evaluation.run_id") if version else None
    if not run_id:
        return None
    return evaluation_predictions(run_id, scratch), f"{name}@{alias} (v{version.version})", str(version.version)


def gate_reference(against: str, settings: Gate, registered_model: str, scratch: Path) -> tuple[Path, str]:
    """The gate's reference predictions file and its name in the report: `against` when it is a file;
    for `auto`, the champion's (in the tracking store) unless the champion is the model evaluated here,
    else `gate.reference` (`settings`: the gate params)."""
    if against != "auto":
        return Path(against), against
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        found = champion_predictions(mlflow.MlflowClient(), registered_model, scratch)
    except Exception as error:  # no reachable store, no artifact: fall back, but say so
        log.info("no champion to compare with (%s): using %s", error, settings.reference)
        found = None
    if found is not None:
        path, name, _ = found
        if Path(settings.predictions).read_bytes() != path.read_bytes():
            return path, name
        log.info("the champion is the model evaluated here: comparing with %s instead", settings.reference)
    return Path(settings.reference), settings.reference
