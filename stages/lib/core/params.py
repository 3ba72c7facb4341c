"""Typed `params.yaml`: every section as a pydantic model (the stages' sections in sections.py), checked
before any work.

`load_params()` reads the whole file and fails with `ParamsError`, naming each bad key
(`finetune.phases.1.lr: ...`) and suggesting the closest valid key for a typo. The section models are
importable from here (`from stages.lib.core.params import Finetune`).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.lib.core.errors import PipelineError
from stages.lib.core.sections import (
    Abstain,
    Audit,
    Augment,
    Candidate,
    Evaluate,
    Export,
    Features,
    Finetune,
    FusionHead,
    Gate,
    GateCheck,
    Margin,
    Model,
    NearDuplicates,
    Phase,
    Recipe,
    Section,
    Select,
    Split,
    Validate,
)

__all__ = [  # the section models, for `from stages.lib.core.params import ...`
    "Abstain", "Audit", "Augment", "Candidate", "Evaluate", "Export", "Features", "Finetune", "FusionHead", "Gate",
    "GateCheck", "Margin", "Model", "NearDuplicates", "Phase", "Recipe", "Select", "Split", "Validate",
]  # fmt: skip


class ParamsError(PipelineError, ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the keys."""


class Base(Section):
    seed: int = 42


class Data(Section):
    images_dir: str = "data/images"
    manifest: str | None = None  # CSV of path,label[,split] inside images_dir; None: the folder's classes


class Mlflow(Section):
    experiment: str = "transfer-learning"
    registered_model: str = "image-classifier"


class Params(Section):
    base: Base = Base()
    data: Data = Data()
    validate_: Validate = Field(Validate(), alias="validate")
    split: Split = Split()
    audit: Audit = Audit()
    model: Model = Model()
    augment: Augment = Augment()
    features: Features = Features()
    finetune: Finetune
    evaluate: Evaluate = Evaluate()
    export: Export = Export()
    gate: Gate = Gate()
    mlflow: Mlflow = Mlflow()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def candidates(self) -> list[Candidate]:
        """The candidate backbones, with `model.weights` (when set) as every candidate's weight source."""
        if self.model.weights is None:
            return list(self.features.candidates)
        return [candidate.model_copy(update={"weights": self.model.weights}) for candidate in self.features.candidates]

    def section(self, name: str) -> dict:
        """One section as plain data, as written in params.yaml (for logging)."""
        return self.model_dump(by_alias=True, mode="json")[name]

    def subset(self, keys: list[str]) -> dict:
        """The params under `keys` as dvc.yaml names them (`finetune`, `model.image_size`), as nested plain
        data: {'model': {'image_size': 80}, 'finetune': {...}}."""
        everything = self.model_dump(by_alias=True, mode="json")
        chosen: dict = {}
        for key in keys:
            *path, last = key.split(".")
            source, target = everything, chosen
            for part in path:
                source, target = source[part], target.setdefault(part, {})
            target[last] = source[last]
        return chosen


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _describe(error: dict) -> str:
    """One line per pydantic error: the dotted key, the reason and, for a typo, a suggestion."""
    location = ".".join(str(part) for part in error["loc"])
    message = f"{location}: {error['msg']}"
    if error["type"] == "extra_forbidden":
        *parent_path, key = error["loc"]
        model: type[BaseModel] = Params
        for part in parent_path:
            if isinstance(part, int):
                continue
            annotation = model.model_fields[_field_name(model, str(part))].annotation
            model = _model_in(annotation)
        close = difflib.get_close_matches(str(key), _known_keys(model), n=1)
        message = f"{location}: unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
    return message


def _field_name(model: type[BaseModel], key: str) -> str:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return name
    raise KeyError(key)


def _model_in(annotation) -> type[BaseModel]:
    """The pydantic model inside an annotation such as `list[Phase]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        if isinstance(argument, type) and issubclass(argument, BaseModel):
            return argument
    raise TypeError(annotation)


def parse_params(raw: dict, source: str = "params.yaml", timm_names: bool = True) -> Params:
    """Validate a params mapping; raise ParamsError listing every bad key. timm_names: also check
    names that only timm knows (optimizers; see `timm_optimizer_names`)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw, context={"timm_names": timm_names})
    except ValidationError as error:
        lines = [_describe(item) for item in error.errors()]
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = "params.yaml", timm_names: bool = True) -> Params:
    """Read and validate params.yaml (the whole file, so a typo anywhere fails every stage)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw or {}, str(path), timm_names)
