"""The MLflow model registry: aliases for evaluated versions.

Every evaluated version becomes `@challenger`; it becomes `@champion` when there is no champion
yet or it beats the champion's test metric (stored as a version tag) by more than a margin.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def should_promote(challenger_score: float, champion_score: float | None, min_improvement: float) -> bool:
    """The promotion rule, on its own so that it can be read and tested."""
    return champion_score is None or challenger_score > champion_score + min_improvement


def champion_score(client, name: str, metric: str) -> tuple[str | None, float | None]:
    """(version, score) of the current champion, or (None, None)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    score = champion.tags.get(f"test_{metric}")
    return str(champion.version), (float(score) if score is not None else None)


def record_evaluation(name: str, version: str, metrics: dict[str, float], metric: str, min_improvement: float,
                      description: str | None = None) -> dict:
    """Tag the version with its test metrics (and describe it), alias it challenger, promote it if it wins."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, f"test_{key}", f"{value:.6f}")
    if description:
        client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, "challenger", version)
    champion_version, score = champion_score(client, name, metric)
    promoted = champion_version == version or should_promote(metrics[metric], score, min_improvement)
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
        log.info("%s version %s is @champion (%s %.4f, previous %s)", name, version, metric, metrics[metric], score)
    else:
        log.info("%s version %s stays @challenger: %s %.4f vs champion v%s %.4f", name, version, metric,
                 metrics[metric], champion_version, score)
    return {"version": version, "champion": promoted, "champion_version": version if promoted else champion_version}
