"""cleanlab's Datalab on the audit set, turned into the reports a person reads and the checks that gate.

Datalab gets the standardised embeddings and the out-of-sample probabilities and looks for four issue
types: `label` (the given class disagrees with confident out-of-sample predictions; `label_filter` is
cleanlab's `filter_by`: prune_by_class estimates, from the confident joint, how many of each given class's
images are mislabelled and flags that many of its least confident ones; prune_by_noise_rate, cleanlab's
default, estimates a count per pair of given and likely true class and flags that many by margin), `outlier` (far from
its nearest neighbours in embedding space; a low score is unusual), `near_duplicate` (closer than
`near_duplicate_threshold` x the median nearest-neighbour distance) and `class_imbalance`. The near copies
validate grouped by their pixels are added (found by `signature`), and every near-copy set that spans two
splits is a leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stages.lib.audit.probes import AuditSet, standardised

CHECKS = ("train_test_leak", "leak", "label_issues", "outliers")


@dataclass
class Findings:
    label_issues: pd.DataFrame  # path, split, label, suggested, score (worst first)
    near_duplicates: pd.DataFrame  # group, path, split, label, distance, found_by
    outliers: pd.DataFrame  # path, split, label, score (every image, most unusual first)
    class_imbalance: list[str]  # classes cleanlab flags as rare
    leaks: pd.DataFrame = field(default_factory=pd.DataFrame)  # group, splits, paths


def run_datalab(
    data: AuditSet, probabilities: np.ndarray, near_duplicate_threshold: float, label_filter: str = "prune_by_class"
):
    """Datalab's findings for the four issue types (the `Datalab` object, for its tables and info)."""
    from cleanlab import Datalab

    lab = Datalab(data={"label": np.asarray(data.classes)[data.labels]}, label_name="label", verbosity=0)
    issue_types = {
        "label": {"clean_learning_kwargs": {"find_label_issues_kwargs": {"filter_by": label_filter}}},
        "outlier": {},
        "near_duplicate": {"threshold": near_duplicate_threshold},
        "class_imbalance": {},
    }
    lab.find_issues(features=standardised(data.features), pred_probs=probabilities, issue_types=issue_types)
    return lab


def _nearest_distance(features: np.ndarray, members: list[int]) -> list[float]:
    """Each member's distance to the nearest other member (standardised embeddings, Euclidean, per dimension)."""
    points = features[members]
    distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).mean(axis=-1))
    np.fill_diagonal(distances, np.inf)
    return [round(float(value), 4) for value in distances.min(axis=1)]


def _embedding_sets(near_sets: list) -> list[list[int]]:
    """Datalab's per-image near-duplicate neighbours as connected sets of two or more images."""
    parent = list(range(len(near_sets)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, neighbours in enumerate(near_sets):
        for j in neighbours:
            parent[root(int(j))] = root(i)
    sets: dict[int, list[int]] = {}
    for i in range(len(near_sets)):
        sets.setdefault(root(i), []).append(i)
    return sorted((members for members in sets.values() if len(members) > 1), key=lambda m: m[0])


def near_duplicate_table(data: AuditSet, near_sets: list) -> pd.DataFrame:
    """Every image with a near copy: the signature's groups (validate) and the embeddings' sets (Datalab)."""
    features, table = standardised(data.features), data.table
    rows = []
    signature_groups = table[table["group"] != ""].groupby("group", sort=True).groups
    found = [
        (f"signature:{name}", "signature", sorted(int(i) for i in index)) for name, index in signature_groups.items()
    ]
    found += [
        (f"embedding:{number}", "embedding", members)
        for number, members in enumerate(_embedding_sets(near_sets), start=1)
    ]
    for group, found_by, members in found:
        for index, distance in zip(members, _nearest_distance(features, members)):
            image = table.iloc[index]
            rows.append(
                {
                    "group": group,
                    "path": image["path"],
                    "split": image["split"],
                    "label": image["label"],
                    "distance": distance,
                    "found_by": found_by,
                }
            )
    return pd.DataFrame(rows, columns=["group", "path", "split", "label", "distance", "found_by"])


def leaks(near_duplicates: pd.DataFrame) -> pd.DataFrame:
    """The near-copy sets that span two or more splits: group, splits, paths."""
    rows = [
        {"group": group, "splits": "+".join(sorted(set(members["split"]))), "paths": " ".join(members["path"])}
        for group, members in near_duplicates.groupby("group", sort=True)
        if members["split"].nunique() > 1
    ]
    return pd.DataFrame(rows, columns=["group", "splits", "paths"])


def findings(
    data: AuditSet, probabilities: np.ndarray, near_duplicate_threshold: float, label_filter: str = "prune_by_class"
) -> Findings:
    """Datalab's issues as the audit's tables (label_filter: the `audit.label_filter` param)."""
    lab = run_datalab(data, probabilities, near_duplicate_threshold, label_filter)
    issues, table = lab.get_issues(), data.table
    suggested = np.asarray(data.classes)[probabilities.argmax(axis=1)]
    flagged = issues["is_label_issue"].to_numpy()
    label_issues = pd.DataFrame(
        {
            "path": table["path"],
            "split": table["split"],
            "label": table["label"],
            "suggested": suggested,
            "score": issues["label_score"].round(6),
        }
    )[flagged]
    outliers = pd.DataFrame(
        {
            "path": table["path"],
            "split": table["split"],
            "label": table["label"],
            "score": issues["outlier_score"].round(6),
            "flagged": issues["is_outlier_issue"].to_numpy(),
        }
    )
    imbalance = issues["is_class_imbalance_issue"].to_numpy()
    near = near_duplicate_table(data, lab.get_info("near_duplicate")["near_duplicate_sets"])
    return Findings(
        label_issues=label_issues.sort_values(["score", "path"]).reset_index(drop=True),
        near_duplicates=near,
        outliers=outliers.sort_values(["score", "path"]).reset_index(drop=True),
        class_imbalance=sorted(set(table.loc[imbalance, "label"])),
        leaks=leaks(near),
    )


def suggested_corrections(found: Findings, outlier_score: float) -> pd.DataFrame:
    """Rows in data/corrections.csv's format: relabel each label issue, exclude each outlier."""
    relabel = [
        {
            "path": row.path,
            "action": "relabel",
            "label": row.suggested,
            "note": f"audit: label issue, given {row.label}, out-of-sample probes say {row.suggested} "
            f"(score {row.score:.3f})",
        }
        for row in found.label_issues.itertuples()
    ]
    outliers = found.outliers[found.outliers["flagged"] | (found.outliers["score"] < outlier_score)]
    relabelled = {row["path"] for row in relabel}
    exclude = [
        {"path": row.path, "action": "exclude", "label": "", "note": f"audit: outlier (score {row.score:.3f})"}
        for row in outliers.itertuples()
        if row.path not in relabelled
    ]
    return pd.DataFrame(relabel + exclude, columns=["path", "action", "label", "note"])


def headline(found: Findings, images: int, outlier_score: float) -> dict:
    """metrics/audit.json: counts only."""
    near = found.near_duplicates
    straddle = list(found.leaks["splits"])
    return {
        "images": images,
        "label_issues": len(found.label_issues),
        "label_issue_fraction": round(len(found.label_issues) / max(images, 1), 4),
        "outliers": int((found.outliers["flagged"] | (found.outliers["score"] < outlier_score)).sum()),
        "near_duplicate_images": {by: int((near["found_by"] == by).sum()) for by in ("signature", "embedding")},
        "leaks": {
            "across_splits": len(found.leaks),
            "train_test": sum("train" in splits and "test" in splits for splits in straddle),
        },
        "rare_classes": len(found.class_imbalance),
    }


def failed_checks(counts: dict, max_label_issue_fraction: float) -> dict[str, str]:
    """check name -> what failed, for the checks whose condition holds."""
    failed = {}
    if counts["leaks"]["train_test"]:
        failed["train_test_leak"] = f"{counts['leaks']['train_test']} near-copy sets span train and test"
    if counts["leaks"]["across_splits"]:
        failed["leak"] = f"{counts['leaks']['across_splits']} near-copy sets span two splits"
    if counts["label_issue_fraction"] > max_label_issue_fraction:
        failed["label_issues"] = (
            f"{counts['label_issue_fraction']:.1%} of the images flagged as label issues "
            f"> {max_label_issue_fraction:.1%}"
        )
    if counts["outliers"]:
        failed["outliers"] = f"{counts['outliers']} outliers"
    return failed
