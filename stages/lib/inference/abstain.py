"""The abstain rule (model/abstention.py) of a model folder, applied by every answer (fitted by abstain_fit.py).

- `Abstainer`: a folder's rule with its reference: (probabilities, embeddings) -> `Decisions`.
- `answer_columns`: the `ood_score`, `abstained` and `reason` of a batch, for `ImageClassifier.predict`.
- `abstain_artifacts`: the rule's files that the MLflow pyfunc ships beside config.json;
- `write_export_rule` / `read_export_rule`: the rule in the ONNX export folder (`abstain.json` + the reference);
  a quantised variant has its own (`abstain_int8.json` + `abstain_reference_int8.npz`, `rule_files`), fitted
  on that file's outputs by abstain_fit.py: int8 convolutions move the embedding far more than the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.lib.core.errors import PipelineError
from stages.lib.model.abstention import AbstainSpec, Decisions, Reference, decide, read_reference
from stages.lib.model.card import FinetunedCard

EXPORT_RULE_FILE = "abstain.json"  # in the ONNX export folder: the rule, and how to apply it to the outputs
OWN_RULE = {"onnx_int8": "int8"}  # export variants whose rule is fitted on their own outputs: file suffix


class Abstainer:
    """The abstain rule of a model folder, with the training embeddings it compares against."""

    def __init__(self, spec: AbstainSpec, reference: Reference):
        self.spec, self.reference = spec, reference

    @classmethod
    def of_folder(cls, folder: Path, card: FinetunedCard) -> "Abstainer | None":
        """The folder's rule, or None when its card has none (a model trained before the rule existed)."""
        if card.abstain is None:
            return None
        path = Path(folder) / card.abstain.reference
        if not path.is_file():
            raise PipelineError(f"{path}: missing (the model card's abstain rule needs it; re-run finetune)")
        return cls(card.abstain, read_reference(folder, card.abstain))

    def ood_scores(self, embeddings: np.ndarray) -> np.ndarray:
        return self.reference.scores(embeddings)

    def decide(self, probabilities: np.ndarray, embeddings: np.ndarray) -> Decisions:
        return decide(probabilities, self.ood_scores(embeddings), self.spec)


def answer_columns(abstainer: Abstainer | None, probabilities: np.ndarray, embeddings: np.ndarray) -> list[dict]:
    """Per image: `ood_score` (None without a rule), `abstained`, `reason` ("" when answered)."""
    if abstainer is None:
        return [{"ood_score": None, "abstained": False, "reason": ""} for _ in probabilities]
    decisions = abstainer.decide(probabilities, embeddings)
    return [
        {"ood_score": round(float(score), 6), "abstained": bool(flag), "reason": reason}
        for score, flag, reason in zip(decisions.ood_score, decisions.abstained, decisions.reason)
    ]


def abstain_artifacts(model_dir: Path, card: FinetunedCard) -> dict[str, str]:
    """The files a logged model needs for its rule besides model.pt and config.json ({} without a rule)."""
    return {"abstain_reference": str(Path(model_dir) / card.abstain.reference)} if card.abstain else {}


def rule_files(variant: str = "onnx") -> tuple[str, str]:
    """The export folder's (rule, reference) file names for an ONNX variant."""
    suffix = OWN_RULE.get(variant)
    return (f"abstain_{suffix}.json", f"abstain_reference_{suffix}.npz") if suffix else (EXPORT_RULE_FILE, "")


def write_rule(path: Path, spec: AbstainSpec) -> Path:
    """`spec` as an export folder's rule file: the thresholds, and the post-processing a caller applies to the
    ONNX outputs `logits` and `embedding`."""
    rule = spec.model_dump() | {
        "apply": [
            "probabilities = softmax(logits); confidence = max(probabilities)",
            f"means, W = numpy.load('{spec.reference}') ['means'], ['whitening']",
            "ood_score = min over the rows m of means of |(embedding - m) @ W|^2",
            "abstained, reason = (true, 'unknown input') if ood_score > ood_threshold, else (true, 'low "
            "confidence') if confidence < confidence_threshold, else (false, '')",
        ],
    }
    path.write_text(json.dumps(rule, indent=2) + "\n")
    return path


def write_export_rule(folder: Path, model_dir: Path, card: FinetunedCard) -> Path | None:
    """The model's rule in an export folder: its reference file and `abstain.json`; None without a rule."""
    if card.abstain is None:
        return None
    folder = Path(folder)
    (folder / card.abstain.reference).write_bytes((Path(model_dir) / card.abstain.reference).read_bytes())
    return write_rule(folder / EXPORT_RULE_FILE, card.abstain)


def read_export_rule(folder: Path, variant: str = "onnx") -> Abstainer | None:
    """The rule of an export folder for one ONNX variant (`rule_files`), or None when it has none."""
    path = Path(folder) / rule_files(variant)[0]
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    spec = AbstainSpec.model_validate({key: value for key, value in values.items() if key != "apply"})
    return Abstainer(spec, read_reference(folder, spec))
