"""features: choose the backbone. Probe each candidate on frozen embeddings, rank them, keep the winner.

For each of `features.candidates` (timm name + weight source; `model.weights`, when set, replaces
every candidate's source, e.g. `none` for the from-scratch ablation): pooled embeddings of train/val/test
(optionally fused from the last `features.fusion_stages` feature stages), cached per candidate in
--cache (resolved under the real repository root, shared by `dvc exp run --temp/--queue` copies;
not a DVC out), then a logistic regression tuned on val. `features.select` picks the backbone
finetune uses.

Writes: --out/<candidate>.npz (embeddings per candidate), --baseline/head.pt (the winner's probe as a
linear head on raw embeddings: the baseline evaluate compares against), --baseline/classifier.pt (the
LP-FT start for finetune: the same probe, or with fusion a probe on the pre-logits columns, which is
all the model's classifier sees), --baseline/probe.json (names the chosen `model` and `weights`),
--baseline/fusion.pt (with `features.fusion_mode` concat | gated | attention: a fusion head trained on the
winner's cached embeddings, finetune's start instead of classifier.pt; stages/lib/model/fusion.py),
--fusion-weights and --fusion-figure (its mean weight per source on val, overall and per class: gate,
attention weight, or concat's share of the predicted logit; no rows with fusion_mode none), --metrics (the
winner's probe val accuracy), --leaderboard (a CSV: every candidate's val accuracy and log loss, C,
parameters, embedding dimension, CPU latency) and --plot. Choosing looks at val only: the test split is
scored once, by evaluate.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from stages.lib.core.metrics_io import write_metrics
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.store import repo_root
from stages.lib.core.tracking import stage_run
from stages.lib.data.prepared import load_meta
from stages.lib.model.card import BaselineCard, BaselineFusion
from stages.lib.training.fusion_training import fuse_winner, weights_figure
from stages.lib.training.leaderboard import (
    Entry,
    check_candidates,
    choose,
    leaderboard,
    leaderboard_figure,
    log_leaderboard,
    probe_candidate,
    with_fusion_rows,
)
from stages.lib.training.probe import classifier_probe, prepared_digest, prune_cache

log = logging.getLogger("features")


def lpft_head(winner: Entry, settings, seed: int) -> dict:
    """The head fine-tuning starts from: the winner's probe when its embeddings are exactly the
    classifier's input, else (fusion) a probe on the classifier's columns of the same embeddings."""
    if winner.embedding_dim == winner.classifier_dim:
        return winner.head
    head = classifier_probe(Path(winner.features), winner.classifier_dim, settings.C, settings.max_iter, seed)
    log.info(
        "LP-FT head: a probe on the %d pre-logits columns (val %.4f; the fused baseline: %.4f)",
        winner.classifier_dim,
        head["val_accuracy"],
        winner.val_accuracy,
    )
    return head


def save_head(head: dict, path: Path) -> None:
    torch.save({"weight": torch.from_numpy(head["weight"]), "bias": torch.from_numpy(head["bias"])}, path)


def save_baseline(
    folder: Path, winner: Entry, classifier_head: dict, classes: list[str], settings, fused: dict | None
) -> None:
    """head.pt (the baseline probe), classifier.pt (the LP-FT start), with a fusion head (`fused`: fuse_winner's)
    fusion.pt (finetune's start instead), and probe.json (what later stages need; `settings`: the features params)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_head(winner.head, folder / "head.pt")
    save_head(classifier_head, folder / "classifier.pt")
    fusion = None
    if fused:
        torch.save(fused["head"].state_dict(), folder / "fusion.pt")
        fusion = BaselineFusion(
            mode=settings.fusion_mode,
            stages=settings.fusion_stages,
            dim=settings.fusion_head.dim,
            sources=fused["sources"],
            val_accuracy=fused["summary"]["val_accuracy"],
        )
    BaselineCard(
        model=winner.name,
        weights=winner.weights,
        classes=classes,
        embedding_dim=winner.embedding_dim,
        classifier_dim=winner.classifier_dim,
        fusion_stages=settings.fusion_stages,
        C=winner.C,
        grid=winner.head["grid"],
        classifier_C=classifier_head["C"],
        features=winner.features,
        data_config=winner.data_config,
        fusion=fusion,
    ).write(folder)


def no_weights(classes: list[str]):
    """The fusion-weights table without a fusion head (fusion_mode none): no rows."""
    import pandas as pd

    return pd.DataFrame(columns=["source", "all"] + list(classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="embedding cache, relative to the repository root")
    parser.add_argument("--out", type=Path, required=True, help="folder for the candidates' embeddings")
    parser.add_argument("--baseline", type=Path, required=True, help="folder for the winner's probe head")
    parser.add_argument("--metrics", type=Path, required=True, help="the winner's probe val accuracy (JSON)")
    parser.add_argument("--leaderboard", type=Path, required=True, help="every candidate's row (CSV)")
    parser.add_argument("--plot", type=Path, required=True, help="the leaderboard figure (PNG)")
    parser.add_argument(
        "--fusion-weights",
        type=Path,
        required=True,
        help="mean fusion weight per source on val, overall and per class (CSV; empty without a "
        "gated or attention head)",
    )
    parser.add_argument("--fusion-figure", type=Path, required=True, help="the same as a figure (PNG)")
    args = parser.parse_args()
    setup_stage(gpu=True)
    params = load_params()
    settings = params.features

    with stage_run("features", params):
        import mlflow

        check_candidates(params.candidates(), settings.fusion_stages)
        meta = load_meta(args.prepared)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        digest = prepared_digest(args.prepared)
        cache = repo_root() / args.cache
        entries = [
            probe_candidate(candidate, args.prepared, digest, cache, args.out, settings, params.base.seed, device)
            for candidate in params.candidates()
        ]
        for stale in prune_cache(cache, digest):
            log.info("removed cached embeddings of an older data version: %s", stale)
        winner = choose(entries, settings.select)
        board = leaderboard(entries, winner, settings.select)

        classifier_head = lpft_head(winner, settings, params.base.seed)
        fused = (
            None
            if settings.fusion_mode == "none"
            else fuse_winner(
                winner, meta["classes"], meta["image_size"], settings, params.model.drop_rate, params.base.seed
            )
        )
        save_baseline(args.baseline, winner, classifier_head, meta["classes"], settings, fused)
        weights = no_weights(meta["classes"])
        if fused:
            board = with_fusion_rows(board, winner, classifier_head, settings.fusion_mode, fused["summary"])
            weights = fused["weights"]
            mlflow.log_metrics({f"fusion.{key}": value for key, value in fused["summary"].items()})
        args.fusion_weights.parent.mkdir(parents=True, exist_ok=True)
        weights.to_csv(args.fusion_weights, index=False)
        weights_figure(weights, settings.fusion_mode, args.fusion_figure)
        mlflow.log_artifact(str(args.fusion_figure), artifact_path="fusion")
        write_metrics(args.metrics, {"probe": {"val_accuracy": winner.val_accuracy}})
        mlflow.log_metrics(
            {"probe.val_log_loss": winner.val_log_loss, "lpft_head.val_accuracy": classifier_head["val_accuracy"]}
        )
        mlflow.log_params(
            {"probe.C": winner.C, "probe.embedding_dim": winner.embedding_dim, "lpft_head.C": classifier_head["C"]}
        )
        args.leaderboard.parent.mkdir(parents=True, exist_ok=True)
        board.to_csv(args.leaderboard, index=False)
        leaderboard_figure(
            entries,
            winner,
            args.plot,
            settings.select.latency_budget_ms if settings.select.rule == "latency_budget" else None,
        )
        log_leaderboard(board, args.plot)
    log.info("chosen by %s: %s (probe val %.4f)", settings.select.rule, winner.name, winner.val_accuracy)


if __name__ == "__main__":
    main()
