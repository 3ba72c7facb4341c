"""Staged fine-tuning (stages/lib/training: phases, loop, checkpoint, loaders) on a tiny timm model and tiny
tensors: each practice the recipe relies on, determinism and resuming after a crash."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset

from stages.lib.core.errors import PipelineError
from stages.lib.core.params import Finetune, Phase
from stages.lib.data.preprocessing import DataConfig
from stages.lib.model.backbones import block_groups, set_trainable
from stages.lib.training.checkpoint import Checkpoint, TrainState
from stages.lib.training.distributed import Distributed
from stages.lib.training.loaders import Inputs, make_loaders, seed_epoch
from stages.lib.training.loop import PhaseTools, Trainer, build_loss, build_optimizer, loader_logits, lr_labels
from stages.lib.training.phases import keeps_epoch, run_phases

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
DATA = DataConfig(32, "bilinear", tuple(MEAN), tuple(STD))
CLASSES = 3


def tiny_data(count: int, seed: int) -> TensorDataset:
    """uint8 32x32 images whose class is the brightest colour channel, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % CLASSES
    images = torch.randint(0, 120, (count, 3, 32, 32), generator=generator)
    images[torch.arange(count), labels] += 100
    return TensorDataset(images.to(torch.uint8), labels)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=CLASSES)


def settings(phases: list[dict] | None = None, **overrides) -> Finetune:
    phases = phases or [
        {"name": "head", "trainable": "head", "epochs": 1, "lr": 1e-2},
        {"name": "full", "trainable": "all", "epochs": 2, "lr": 1e-3},
    ]
    overrides = {"model_ema": False, "patience": 3} | overrides  # the plain model is what these tests inspect
    return Finetune(batch_size=16, phases=[Phase(**phase) for phase in phases], **overrides)


def train(model: nn.Module, recipe: Finetune, tmp_path, on_epoch=lambda row: None, seed: int = 0):
    loaders = make_loaders(
        tiny_data(48, 1), tiny_data(24, 2), recipe.batch_size, Distributed(), seed, mixup=recipe.mixes
    )
    return run_phases(model, recipe, loaders, DATA, seed, Checkpoint(tmp_path / "last.pt", "test"), on_epoch)


def batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}


# ----------------------------------------------------------------------------- recipe
def test_a_phase_inherits_the_section_and_overrides_its_own_keys():
    recipe = settings(
        [
            {"name": "a", "epochs": 1, "lr": 1e-3},
            {"name": "b", "epochs": 1, "lr": 1e-4, "weight_decay": 0.0, "mixup_alpha": 0.2},
        ],
        weight_decay=0.01,
        smoothing=0.2,
    )
    first, second = (recipe.recipe(phase) for phase in recipe.phases)
    assert (first.weight_decay, first.smoothing, first.mixup_alpha) == (0.01, 0.2, 0.0)
    assert (second.weight_decay, second.smoothing, second.mixup_alpha) == (0.0, 0.2, 0.2)


def test_the_optimizer_holds_exactly_the_trainable_parameters():
    model = tiny_model()
    recipe = settings().recipe(settings().phases[0])
    for trainable in ("head", 2, "all"):
        chosen = set(set_trainable(model, trainable))
        optimizer = build_optimizer(model, recipe, 1e-3)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert in_optimizer == {id(p) for name, p in model.named_parameters() if name in chosen}
    assert len(set(set_trainable(model, 2))) > len(set(set_trainable(model, "head")))


def test_label_smoothing_and_mixup_losses():
    logits, labels = torch.tensor([[20.0, 0.0, 0.0]]), torch.tensor([0])
    plain, _ = build_loss(settings(smoothing=0.0).recipe(settings().phases[0]), CLASSES)
    smoothed, mixup = build_loss(settings(smoothing=0.1).recipe(settings().phases[0]), CLASSES)
    assert mixup is None
    assert plain(logits, labels).item() < 1e-6
    # 0.9 * nll + 0.1 * mean(-log p): a confident right answer still costs about 0.1 * 20 * 2/3
    assert smoothed(logits, labels).item() == pytest.approx(0.1 * 40 / 3, rel=1e-3)
    soft, mixup = build_loss(settings(mixup_alpha=0.2, cutmix_alpha=1.0).recipe(settings().phases[0]), CLASSES)
    assert type(soft).__name__ == "SoftTargetCrossEntropy"
    images, targets = mixup(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert targets.shape == (4, CLASSES) and torch.allclose(targets.sum(1), torch.ones(4))


# --------------------------------------------------------------------------- phases
def test_frozen_parameters_do_not_move_and_unfrozen_ones_join_in_the_next_phase(tmp_path):
    model = tiny_model()
    groups = block_groups(model)
    snapshots = []
    recipe = settings(
        [
            {"name": "head", "trainable": "head", "epochs": 1, "lr": 1e-2},
            {"name": "top", "trainable": 1, "epochs": 1, "lr": 1e-2},
        ],
        patience=5,
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(
        model,
        recipe,
        tmp_path,
        on_epoch=lambda row: snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()}),
    )
    moved = [{name for name in before if not torch.equal(before[name], snapshot[name])} for snapshot in snapshots]
    classifier = {name for name in before if name.startswith("classifier")}
    assert moved[0] == classifier
    moved_in_top = {name for name in before if not torch.equal(snapshots[0][name], snapshots[1][name])}
    assert set(groups[-1]) <= moved_in_top <= set(groups[-1]) | classifier
    assert not moved_in_top & {name for group in groups[:-1] for name in group}


@pytest.mark.parametrize("train_bn", [False, True])
def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics(tmp_path, train_bn):
    model = tiny_model()
    frozen = {name for group in block_groups(model)[:-4] for name in group}  # below the top 4 groups
    frozen_bn = {name: bn for name, bn in batchnorms(model).items() if f"{name}.weight" in frozen}
    trainable_bn = {name: bn for name, bn in batchnorms(model).items() if f"{name}.weight" not in frozen}
    modes = {name: set() for name in batchnorms(model)}
    for name, bn in batchnorms(model).items():
        bn.register_forward_pre_hook(
            lambda module, args, name=name: modes[name].add(module.training) if torch.is_grad_enabled() else None
        )
    before = {name: bn.running_mean.clone() for name, bn in batchnorms(model).items()}
    train(model, settings([{"name": "top", "trainable": 4, "epochs": 1, "lr": 1e-3}], train_bn=train_bn), tmp_path)
    assert frozen_bn and all(modes[name] == {False} for name in frozen_bn)
    assert all(torch.equal(before[name], bn.running_mean) for name, bn in frozen_bn.items())
    changed = [name for name, bn in trainable_bn.items() if not torch.equal(before[name], bn.running_mean)]
    if train_bn:  # trainable BatchNorm learns batch statistics only when asked
        assert changed and all(modes[name] == {True} for name in trainable_bn)
    else:
        assert not changed and all(modes[name] == {False} for name in trainable_bn)


def one_epoch(trainer: Trainer, recipe: Finetune, loader, loss_fn=None, lr: float = 1e-2) -> tuple[dict, TrainState]:
    """One epoch of the first phase's recipe with every parameter trainable."""
    set_trainable(trainer.model, "all")
    phase = recipe.recipe(recipe.phases[0])
    step = PhaseTools.build(trainer.model, phase, lr, 1, len(loader))
    step.train_bn = False
    if loss_fn:
        step.loss_fn = loss_fn
    state = TrainState()
    seed_epoch(0, 0)
    metrics = trainer.train_epoch(trainer.model, loader, step, state, "test")
    return metrics, state


def test_gradients_are_clipped_to_clip_grad():
    norms = []
    hook = lambda optimizer, args, kwargs: norms.append(
        torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for group in optimizer.param_groups for p in group["params"]])
        ).item()
    )
    handle = register_optimizer_step_pre_hook(hook)
    try:
        for clip_grad in (None, 0.01):
            recipe = settings(clip_grad=clip_grad)
            loader, _ = make_loaders(tiny_data(16, 1), tiny_data(4, 2), 16, Distributed(), 0)
            one_epoch(Trainer(tiny_model(), recipe, MEAN, STD, Distributed()), recipe, loader)
    finally:
        handle.remove()
    unclipped, clipped = norms
    assert unclipped > 0.02 and clipped == pytest.approx(0.01, rel=1e-4)


def test_ema_and_mixup_train_and_the_ema_is_what_is_validated_and_kept(tmp_path):
    recipe = settings(model_ema=True, model_ema_decay=0.9, mixup_alpha=0.4, cutmix_alpha=1.0)
    trainer = Trainer(tiny_model(), recipe, MEAN, STD, Distributed())
    train_loader, val_loader = make_loaders(tiny_data(48, 1), tiny_data(24, 2), 16, Distributed(), 0, mixup=True)
    loss_fn, _ = build_loss(recipe.recipe(recipe.phases[0]), CLASSES)
    seen_targets = []
    metrics, state = one_epoch(
        trainer, recipe, train_loader, lambda logits, targets: seen_targets.append(targets) or loss_fn(logits, targets)
    )
    assert math.isfinite(metrics["train_loss"]) and state.updates == 3
    assert all(targets.shape == (16, CLASSES) for targets in seen_targets)  # soft, mixed targets
    assert any((targets.max(1).values < 0.85).any() for targets in seen_targets)
    ema_weights = trainer.ema.module.state_dict()
    assert not torch.equal(ema_weights["classifier.weight"], trainer.model.state_dict()["classifier.weight"])
    assert torch.equal(trainer.kept_weights()["classifier.weight"], ema_weights["classifier.weight"])
    # validation scores the EMA weights
    logits, labels = loader_logits(trainer.ema.module, val_loader, Inputs(MEAN, STD, torch.device("cpu")))
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert trainer.evaluate(val_loader)["val_loss"] == pytest.approx(expected, rel=1e-6)
    # and a whole run with both on completes
    state = train(tiny_model(), recipe, tmp_path)
    assert len(state.history) == 3 and all(math.isfinite(row["val_loss"]) for row in state.history)


def test_lr_per_block_group_shows_the_phases(tmp_path):
    state = train(tiny_model(), settings(patience=5), tmp_path)
    labels = lr_labels(tiny_model())
    columns = list(labels)
    assert columns == ["lr_head"] + [f"lr_top{n}" for n in range(1, len(block_groups(tiny_model())) + 1)]
    assert labels["lr_top1"] == block_groups(tiny_model())[-1] and labels["lr_head"][0].startswith("classifier")
    head, full = state.history[0], state.history[1]
    assert head["lr_head"] > 0 and all(head[column] == 0 for column in columns if column != "lr_head")
    assert all(full[column] > 0 for column in columns)
    assert [row["phase_index"] for row in state.history] == [0, 1, 1]


def test_the_keep_rule_keeps_a_lower_val_loss_or_the_final_epoch():
    assert keeps_epoch("best_val_loss", 0.5, 0.6, final=False)
    assert not keeps_epoch("best_val_loss", 0.6, 0.6, final=True)  # a tie keeps the earlier epoch
    assert keeps_epoch("last", 9.0, 0.1, final=True) and not keeps_epoch("last", 0.1, 9.0, final=False)


@pytest.mark.parametrize("keep", ["best_val_loss", "last"])
def test_the_kept_weights_are_the_best_epochs_by_val_loss_or_the_last(tmp_path, keep):
    model = tiny_model()
    recipe = settings(
        [
            {"name": "good", "trainable": "all", "epochs": 2, "lr": 1e-2},
            {"name": "wreck", "trainable": "all", "epochs": 2, "lr": 1.0},
        ],
        patience=5,
        clip_grad=None,
        keep=keep,
    )
    kept = {}
    state = train(
        model,
        recipe,
        tmp_path,
        on_epoch=lambda row: kept.setdefault(
            row["epoch"], {name: value.clone() for name, value in model.state_dict().items()}
        ),
    )
    losses = [row["val_loss"] for row in state.history]
    assert all(math.isfinite(loss) for loss in losses) and len(losses) == 4
    expected = 1 + losses.index(min(losses)) if keep == "best_val_loss" else 4
    assert state.kept_epoch == expected and (keep == "last" or state.kept_epoch <= 2)
    assert all(torch.equal(value, kept[state.kept_epoch][name]) for name, value in model.state_dict().items())


def test_early_stopping_counts_within_a_phase(tmp_path):
    """A phase stops after `patience` epochs without beating its own best val loss; it is not held to
    the previous phase's best (a new phase may start worse and still improve)."""
    recipe = settings(
        [
            {"name": "learn", "trainable": "all", "epochs": 2, "lr": 1e-2},
            {"name": "frozen", "trainable": "all", "epochs": 6, "lr": 1e-12, "min_lr": 0.0, "patience": 2},
        ]
    )
    state = train(tiny_model(), recipe, tmp_path)  # lr 1e-12 leaves the weights and so the val loss unchanged
    assert [row["phase"] for row in state.history] == ["learn", "learn", "frozen", "frozen", "frozen"]
    frozen_losses = {row["val_loss"] for row in state.history[2:]}
    assert len(frozen_losses) == 1


# ---------------------------------------------------------------- determinism, resume
def recipe_with_everything() -> Finetune:
    return settings(
        [
            {"name": "head", "trainable": "head", "epochs": 1, "lr": 1e-2},
            {"name": "top", "trainable": 2, "epochs": 2, "lr": 1e-3, "warmup_epochs": 1, "layer_decay": 0.8},
            {"name": "full", "trainable": "all", "epochs": 2, "lr": 5e-4},
        ],
        model_ema=True,
        mixup_alpha=0.2,
        patience=5,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[TrainState, dict]:
    """One uninterrupted run of the full recipe: its state and its final weights."""
    model = tiny_model()
    state = train(model, recipe_with_everything(), tmp_path_factory.mktemp("uninterrupted"))
    return state, model.state_dict()


def test_two_runs_with_the_same_seed_are_identical(uninterrupted, tmp_path):
    first, weights = uninterrupted
    second_model = tiny_model()
    second = train(second_model, recipe_with_everything(), tmp_path / "b")
    assert second.history == first.history
    assert all(torch.equal(value, weights[key]) for key, value in second_model.state_dict().items())
    other_seed = train(tiny_model(), recipe_with_everything(), tmp_path / "c", seed=1)
    assert other_seed.history != first.history


class Crash(Exception):
    pass


def crash_after(epoch: int):
    def on_epoch(row):
        if row["epoch"] == epoch:
            raise Crash

    return on_epoch


@pytest.mark.parametrize("crash_epoch", [2, 3])  # inside a phase, and at a phase boundary
def test_a_crashed_run_resumes_from_its_last_epoch_and_ends_as_an_uninterrupted_one(
    uninterrupted, tmp_path, crash_epoch, caplog
):
    straight, weights = uninterrupted
    with pytest.raises(Crash):
        train(tiny_model(), recipe_with_everything(), tmp_path, on_epoch=crash_after(crash_epoch + 1))
    replayed = []
    resumed_model = tiny_model()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stages.lib.training"):
        resumed = train(resumed_model, recipe_with_everything(), tmp_path, on_epoch=replayed.append)
    assert f"resuming after epoch {crash_epoch} " in caplog.text
    trained = [int(line.split()[1]) for line in caplog.messages if line.startswith("epoch ")]
    assert trained == list(range(crash_epoch + 1, len(straight.history) + 1))  # only the epochs after the crash
    assert [row["epoch"] for row in replayed] == list(range(1, len(straight.history) + 1))  # earlier ones replayed
    assert resumed.history == straight.history
    assert all(torch.equal(value, weights[key]) for key, value in resumed_model.state_dict().items())


DDP_SCRIPT = """
import json, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from stages.lib.training import distributed
from stages.lib.training.checkpoint import Checkpoint
from stages.lib.training.loaders import make_loaders
from stages.lib.training.phases import run_phases
from test_training import DATA, recipe_with_everything, tiny_data, tiny_model
dist = distributed.setup()
recipe = recipe_with_everything().model_copy(update={"mixup_alpha": 0.0})  # mixup pairs differ per process
loaders = make_loaders(tiny_data(48, 1), tiny_data(24, 2), 16, dist, 0)
state = run_phases(tiny_model(), recipe, loaders, DATA, 0, Checkpoint(Path(sys.argv[2]), "ddp"), dist=dist)
if dist.is_main:
    Path(sys.argv[3]).write_text(json.dumps(state.history))
distributed.shutdown(dist)
"""


def test_torchrun_with_two_processes_trains_as_one_process(tmp_path):
    """DDP (gloo, CPU) through the same code on tiny tensors: the same global batches, so the same
    curve to rounding (the stage-level test in test_finetune.py runs the real stage)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    repo = str(Path(__file__).resolve().parents[1])
    histories = []
    for name, launcher in (
        ("one", [sys.executable]),
        ("two", [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]),
    ):
        result = subprocess.run(
            [*launcher, str(script), repo, str(tmp_path / f"{name}.pt"), str(tmp_path / name)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        histories.append(json.loads((tmp_path / name).read_text()))
    one, two = histories
    assert len(one) == len(two) == 5
    for row_one, row_two in zip(one, two):
        assert row_two["phase"] == row_one["phase"]
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr_head", "lr_top2"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "world_size, batch_size, mixup, message",
    [
        (3, 16, False, "finetune.batch_size: 16 does not split over 3 processes"),
        (2, 6, True, "mixup/cutmix mix pairs, so each process needs an even batch (got 3)"),
    ],
)
def test_a_batch_that_does_not_split_fails_naming_the_key(world_size, batch_size, mixup, message):
    dist = Distributed(rank=0, world_size=world_size)
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_loaders(tiny_data(12, 1), tiny_data(6, 2), batch_size, dist, 0, mixup=mixup)


def test_a_checkpoint_of_another_configuration_is_ignored(tmp_path):
    with pytest.raises(Crash):
        train(tiny_model(), settings(), tmp_path, on_epoch=crash_after(2))
    other = settings(smoothing=0.0)
    loaders = make_loaders(tiny_data(48, 1), tiny_data(24, 2), 16, Distributed(), 0)
    state = run_phases(tiny_model(), other, loaders, DATA, 0, Checkpoint(tmp_path / "last.pt", "other"))
    assert [row["epoch"] for row in state.history] == [1, 2, 3]
