"""The registry's record of an evaluation: the registered version is tagged with its own evaluation (once),
with the evidence for promotion (a paired comparison on the same val images with the champion of the time),
then the aliases are settled by the val rule (aliases.py). Test numbers are reported, never used to choose.
"""

from __future__ import annotations

import logging
import os

import pandas as pd

from stages.lib.core.digest import bytes_sha256
from stages.lib.core.params import Params
from stages.lib.evaluation.comparison import ComparisonError, compare, paired, read_predictions
from stages.lib.registry.aliases import own_evaluation, record_evaluation, settle_aliases
from stages.lib.registry.champion import evaluation_predictions, version_with_alias

log = logging.getLogger(__name__)


def images_digest(paths: list[str], labels: list[str]) -> str:
    """Identifies a set of labelled images: evaluations on the same digest are comparable."""
    lines = sorted(f"{path}\t{label}" for path, label in zip(paths, labels))
    return bytes_sha256("\n".join(lines).encode())[:16]


def champion_evidence(client, name: str, version: str, current_val: pd.DataFrame, val_digest: str) -> dict[str, str]:
    """`promotion.*` tags: this version against the champion of the time, paired on the same val images."""
    import mlflow

    found = version_with_alias(client, name)
    champion = str(found.version) if found else None
    if champion is None or champion == version:
        return {"promotion.compared_with": "none (no champion yet)"}
    tags = found.tags or {}
    if tags.get("val.images") != val_digest or "evaluation.run_id" not in tags:
        return {"promotion.compared_with": f"v{champion}: not comparable (other val images)"}
    try:
        local = evaluation_predictions(tags["evaluation.run_id"])
        labels, reference, current = paired(read_predictions(local, "val"), current_val, f"v{champion}")
    except (ComparisonError, mlflow.exceptions.MlflowException, OSError) as error:
        log.warning("no paired comparison with champion v%s: %s", champion, error)
        return {"promotion.compared_with": f"v{champion}: predictions unavailable"}
    accuracy = compare(labels, reference, current)["accuracy"]
    return {
        "promotion.compared_with": f"v{champion}",
        "promotion.val_accuracy_delta": f"{accuracy.delta:+.4f}",
        "promotion.ci95": f"[{accuracy.ci_low:+.4f}, {accuracy.ci_high:+.4f}]",
        "promotion.mcnemar_p": f"{accuracy.p_value:.4g}",
    }


def record_in_registry(run, params: Params, results: dict, predictions: pd.DataFrame) -> dict | None:
    """Tag the registered version that the evaluated model came from with its own evaluation (once: val score
    and val image digest for promotion, test numbers for reporting, the paired comparison on val with the
    champion of the time), then settle @champion / @challenger by the val rule. run: the evaluate run;
    results: every metric (`Evaluation.results`); predictions: evaluate's predictions table. Returns the
    registry's state (model, version, aliases), or None when the model was not registered in this store."""
    from mlflow import MlflowClient

    rows = predictions[(predictions["split"] == "val") & (predictions["model"] == "finetuned")]
    val_predictions = rows.set_index("path")
    val_digest = images_digest(rows["path"].tolist(), rows["label"].tolist())

    settings, name, client = params.evaluate, params.mlflow.registered_model, MlflowClient()
    finetune_run = run.data.tags.get("upstream.finetune")
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{finetune_run}'") if finetune_run else []
    if not versions:
        log.warning(
            "models/finetuned was not trained in this MLflow store (no finetune run with these outputs): "
            "the registry is left as it is"
        )
        return None
    version = str(versions[0].version)
    experiment = os.environ.get("DVC_EXP_NAME", "workspace")
    if own_evaluation(client, name, version):
        finetuned = results["finetuned"]
        source = versions[0].source or ""
        model_id = getattr(versions[0], "model_id", None) or (
            source.removeprefix("models:/") if source.startswith("models:/m-") else None
        )
        if model_id:  # the logged model's page shows its test numbers too
            import mlflow

            mlflow.log_metrics({f"test.{key}": value for key, value in finetuned["test"].items()}, model_id=model_id)
        tags = {
            "evaluation.run_id": run.info.run_id,
            "evaluation.experiment": experiment,
            "git.commit": run.data.tags.get("git.commit", "unknown"),
            "data.version": run.data.tags.get("data.version", "unknown"),
            f"val.{settings.champion_metric}": f"{finetuned['val'][settings.champion_metric]:.6f}",
            "val.images": val_digest,
        }
        tags |= {f"test.{key}": f"{value:.6f}" for key, value in finetuned["test"].items()}
        tags |= champion_evidence(client, name, version, val_predictions, val_digest)
        record_evaluation(
            client,
            name,
            version,
            tags,
            (
                f"Val {settings.champion_metric} {finetuned['val'][settings.champion_metric]:.4f} (what promotion "
                f"compares). Test, reported only: accuracy {finetuned['test']['accuracy']:.4f} (linear probe "
                f"{results['baseline']['test']['accuracy']:.4f}), macro F1 {finetuned['test']['macro_f1']:.4f}, "
                f"ECE {finetuned['test']['ece']:.4f}. Trained in run {finetune_run}, evaluated in run "
                f"{run.info.run_id} ({experiment}). Input: encoded image files (column `image`); output: label, "
                "probability, probabilities, error."
            ),
        )
    else:
        log.info("version %s was evaluated before: its registry tags stay as its own evaluation wrote them", version)
    aliases = settle_aliases(client, name, settings.champion_metric, settings.min_improvement)
    return {"registered_model": name, "version": version} | aliases
