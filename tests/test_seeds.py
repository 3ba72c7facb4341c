"""`make seeds`: mean ± std and min over the seed experiments of the committed recipe."""

from stages.seeds import param_keys, report, seed_rows


def row(rev, seed, accuracy, lr=0.001, typ="branch_commit", state="Success"):
    """One row as `dvc.api.exp_show()` returns it (columns named by key alone when unambiguous)."""
    return {
        "Experiment": "" if typ == "baseline" else f"exp-{rev}",
        "rev": rev,
        "typ": typ,
        "State": state,
        "finetuned.test.accuracy": accuracy,
        "finetuned.test.macro_f1": accuracy,
        "finetuned.test.ece": 0.01,
        "finetuned.val.accuracy": 0.99,
        "baseline.test.accuracy": 0.97,
        "base.seed": float(seed),
        "finetune.lr": lr,
    }


def test_only_the_committed_recipe_with_other_seeds_counts():
    rows = [
        row("workspace", 42, 0.99, typ="baseline"),
        row("abc1234", 42, 0.99, typ="baseline"),
        row("e1", 1, 1.0),
        row("e2", 2, 0.9963),
        row("e3", 42, 0.9926),
        row("e4", 7, 0.5, lr=0.01),  # another recipe
        row("e5", 8, 0.5, state="Failed"),  # not finished
        row("e6", 2, 0.8),
    ]  # an older run of seed 2: the newest (listed first) counts
    keys = param_keys({"base": {"seed": 42}, "finetune": {"lr": 0.001}})
    chosen = seed_rows(rows, keys)
    assert [r["rev"] for r in chosen] == ["e1", "e2", "e3"]
    text = report(chosen)
    assert "mean" in text and "0.9963" in text and "min" in text
    mean_line = next(line for line in text.splitlines() if line.strip().startswith("mean"))
    assert f"{(1.0 + 0.9963 + 0.9926) / 3:.4f}" in mean_line
