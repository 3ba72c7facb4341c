"""features: choose the backbone. Probe each candidate on frozen embeddings, rank them, keep the winner.

For each of `features.candidates` (timm name + weight source; `model.weights`, when set, replaces
every candidate's source, e.g. `none` for the from-scratch ablation): pooled embeddings of train/val/test
(optionally fused from the last `features.fusion_stages` feature stages), cached per candidate in
--cache (resolved under the real repository root, shared by `dvc exp run --temp/--queue` copies;
not a DVC out), then a logistic regression tuned on val. `features.select` picks the backbone
finetune uses. Choosing looks at val only: the test split is scored once, by evaluate.

Writes: --out/<candidate>.npz (embeddings per candidate); --baseline, the baseline's folder
(stages/lib/training/lpft.py: head.pt, the winner's probe, the baseline evaluate reports; classifier.pt or,
with `features.fusion_mode` concat | gated | attention, fusion.pt: the LP-FT start finetune loads; the card
naming the chosen `model` and `weights`); --fusion-weights and --fusion-figure (the fusion head's mean weight
per source on val, overall and per class; no rows with fusion_mode none); --metrics (the winner's probe val
accuracy); --leaderboard (every candidate's val accuracy and log loss, C, parameters, embedding dimension,
CPU latency) and --plot.
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
from stages.lib.training.fusion_training import fuse_winner, write_fusion_weights
from stages.lib.training.leaderboard import (
    check_candidates,
    choose,
    leaderboard,
    leaderboard_figure,
    log_leaderboard,
    probe_candidates,
    with_fusion_rows,
)
from stages.lib.training.lpft import lpft_probe, write_baseline

log = logging.getLogger("features")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="embedding cache, relative to the repository root")
    parser.add_argument("--out", type=Path, required=True, help="folder for the candidates' embeddings")
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline's folder (probe heads, card)")
    parser.add_argument("--metrics", type=Path, required=True, help="the winner's probe val accuracy (JSON)")
    parser.add_argument("--leaderboard", type=Path, required=True, help="every candidate's row (CSV)")
    parser.add_argument("--plot", type=Path, required=True, help="the leaderboard figure (PNG)")
    parser.add_argument("--fusion-weights", type=Path, required=True, help="mean fusion weight per source (CSV)")
    parser.add_argument("--fusion-figure", type=Path, required=True, help="the same as a figure (PNG)")
    args = parser.parse_args()
    setup_stage(gpu=True)
    params = load_params()
    settings, seed = params.features, params.base.seed

    with stage_run("features", params):
        import mlflow

        check_candidates(params.candidates(), settings.fusion_stages)
        meta = load_meta(args.prepared)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cache = repo_root() / args.cache
        entries = probe_candidates(params.candidates(), args.prepared, cache, args.out, settings, seed, device)
        winner = choose(entries, settings.select)

        lpft = lpft_probe(winner, settings, seed)
        fused = None
        if settings.fusion_mode != "none":
            fused = fuse_winner(
                winner.name,
                Path(winner.features),
                meta["classes"],
                meta["image_size"],
                settings,
                params.model.drop_rate,
                seed,
            )
            mlflow.log_metrics({f"fusion.{key}": value for key, value in fused.metrics().items()})
        write_baseline(args.baseline, winner, lpft, meta["classes"], settings, fused)
        write_fusion_weights(fused, meta["classes"], settings.fusion_mode, args.fusion_weights, args.fusion_figure)
        mlflow.log_artifact(str(args.fusion_figure), artifact_path="fusion")

        board = leaderboard(entries, winner, settings.select)
        if fused:
            board = with_fusion_rows(board, winner, lpft, settings.fusion_mode, fused)
        args.leaderboard.parent.mkdir(parents=True, exist_ok=True)
        board.to_csv(args.leaderboard, index=False)
        budget = settings.select.latency_budget_ms if settings.select.rule == "latency_budget" else None
        leaderboard_figure(entries, winner, args.plot, budget)
        log_leaderboard(board, args.plot)

        write_metrics(args.metrics, {"probe": {"val_accuracy": winner.val_accuracy}})
        mlflow.log_metrics({"probe.val_log_loss": winner.val_log_loss, "lpft_head.val_accuracy": lpft.val_accuracy})
        mlflow.log_params({"probe.C": winner.C, "probe.embedding_dim": winner.embedding_dim, "lpft_head.C": lpft.C})
    log.info("chosen by %s: %s (probe val %.4f)", settings.select.rule, winner.name, winner.val_accuracy)


if __name__ == "__main__":
    main()
