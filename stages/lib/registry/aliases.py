"""The MLflow model registry: each version's own evaluation, and the @champion / @challenger aliases.

- A version's tags and description are written once, by its own evaluation: the first evaluate
  run that sees the version (normally in the same `dvc repro` / `dvc exp run` that trained it).
  A later experiment that reuses the same trained model (say `-S evaluate.top_k=2`) logs its own
  MLflow run and leaves the registry as it was. Tags: `evaluation.run_id`, `evaluation.experiment`
  (the DVC experiment name, or `workspace`), `val.<metric>` (what promotion compares),
  `val.images` (a digest of the val images and labels), `test.<metric>` (reported, never used to
  choose), and `promotion.*` (the paired comparison with the champion of the time: delta, interval,
  p-value).
- Aliases follow from those tags alone (`choose_aliases`): among the versions evaluated on the same
  val images as the newest one, in version order, a version takes @champion from the one before
  when its val score is higher by more than `min_improvement` (ties keep the earlier version).
  @challenger is the newest such version that is not the champion (none when the champion is the
  newest). Because the outcome depends only on the tags, not on who writes last, two pipelines
  evaluating at the same time end with the same aliases: `settle_aliases` sets them, reads the
  registry again, and repeats until it agrees.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Evaluated:
    version: int
    score: float  # val <champion_metric>
    val_images: str  # digest of the val set the score was measured on


def choose_aliases(evaluated: list[Evaluated], min_improvement: float) -> tuple[int | None, int | None]:
    """(champion, challenger) version numbers by the promotion rule; see the module docstring."""
    if not evaluated:
        return None, None
    newest = max(evaluated, key=lambda e: e.version)
    pool = sorted((e for e in evaluated if e.val_images == newest.val_images), key=lambda e: e.version)
    champion = pool[0]
    for candidate in pool[1:]:
        if candidate.score > champion.score + min_improvement:
            champion = candidate
    others = [e.version for e in pool if e.version != champion.version]
    return champion.version, (max(others) if others and max(others) > champion.version else None)


def evaluated_versions(client, name: str, metric: str) -> list[Evaluated]:
    """Every version of `name` with a recorded val score for `metric`."""
    found = []
    for version in client.search_model_versions(f"name = '{name}'"):
        tags = version.tags or {}
        if f"val.{metric}" in tags and "val.images" in tags:
            found.append(Evaluated(int(version.version), float(tags[f"val.{metric}"]), tags["val.images"]))
    return found


def own_evaluation(client, name: str, version: str) -> bool:
    """True when `version` has not been evaluated yet: this evaluation is the one its tags record."""
    return "evaluation.run_id" not in (client.get_model_version(name, version).tags or {})


def record_evaluation(client, name: str, version: str, tags: dict[str, str], description: str) -> None:
    """Write a version's evaluation tags and description (call only when `own_evaluation`)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=description)


def current_alias(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _apply(client, name: str, alias: str, version: int | None) -> None:
    from mlflow.exceptions import MlflowException

    if version is not None:
        client.set_registered_model_alias(name, alias, str(version))
    elif current_alias(client, name, alias) is not None:
        try:
            client.delete_registered_model_alias(name, alias)
        except MlflowException:  # removed meanwhile by a concurrent evaluation
            pass


def settle_aliases(
    client, name: str, metric: str, min_improvement: float, rounds: int = 5, pause_s: float = 0.5
) -> dict[str, str | None]:
    """Set @champion and @challenger from the recorded evaluations, then check again until the registry
    agrees with the rule (a concurrent evaluation may have moved them meanwhile)."""
    for _ in range(rounds):
        champion, challenger = choose_aliases(evaluated_versions(client, name, metric), min_improvement)
        _apply(client, name, CHAMPION, champion)
        _apply(client, name, CHALLENGER, challenger)
        time.sleep(pause_s)
        again = choose_aliases(evaluated_versions(client, name, metric), min_improvement)
        now = (current_alias(client, name, CHAMPION), current_alias(client, name, CHALLENGER))
        expected = tuple(None if v is None else str(v) for v in again)
        if now == expected:
            break
    else:
        log.warning("%s: aliases still moving after %d rounds (many concurrent evaluations?)", name, rounds)
    result = {CHAMPION: now[0], CHALLENGER: now[1]}
    log.info("%s: @champion v%s, @challenger v%s", name, result[CHAMPION], result[CHALLENGER])
    return result
