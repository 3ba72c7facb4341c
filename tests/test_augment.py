"""augment: the online policy from params, class balancing by oversampling, the preview, DVC caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import dvc
from PIL import Image
from test_pipeline import copy_project, stages_run
from torchvision.transforms import v2

from stages.lib.core.params import Augment, ParamsError, parse_params
from stages.lib.data.augmentation import augment_batch, preview_grid, train_transform
from stages.lib.data.prepared import create_images, oversampled_index, save_labels, save_train_index, training_dataset

STILL = {"rotation": 0.0, "translate": 0.0, "scale": (1.0, 1.0)}  # no affine step


def asymmetric(size: int = 16) -> torch.Tensor:
    """uint8 CHW with a different value in every pixel: any flip, crop or shift shows."""
    return torch.arange(3 * size * size, dtype=torch.int64).reshape(3, size, size).remainder(251).to(torch.uint8)


def step_types(settings: Augment) -> list[type]:
    return [type(step) for step in train_transform(settings).transforms]


def test_flips_only_when_enabled():
    image = asymmetric()
    for _ in range(20):
        assert torch.equal(train_transform(Augment(**STILL))(image), image)  # nothing enabled: untouched
    assert not {v2.RandomHorizontalFlip, v2.RandomVerticalFlip} & set(step_types(Augment()))  # digits never flip
    assert torch.equal(train_transform(Augment(**STILL, hflip=1.0))(image), image.flip(-1))
    assert torch.equal(train_transform(Augment(**STILL, vflip=1.0))(image), image.flip(-2))


@pytest.mark.parametrize("policy, kind", [("randaugment", v2.RandAugment), ("trivialaugment", v2.TrivialAugmentWide)])
def test_auto_augment_policies(policy, kind):
    settings = Augment(**STILL, auto_augment=policy, randaugment_ops=3, randaugment_magnitude=15)
    transform = train_transform(settings)
    step = next(step for step in transform.transforms if isinstance(step, kind))
    if kind is v2.RandAugment:
        assert (step.num_ops, step.magnitude) == (3, 15)
    torch.manual_seed(0)
    outputs = [transform(asymmetric()) for _ in range(10)]
    assert all(out.dtype == torch.uint8 and out.shape == (3, 16, 16) for out in outputs)
    assert any(not torch.equal(out, asymmetric()) for out in outputs)


def test_random_resized_crop_keeps_the_size_and_zooms_in():
    torch.manual_seed(0)
    transform = train_transform(Augment(**STILL, crop_scale=(0.25, 0.25)))
    out = transform(asymmetric(32))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and not torch.equal(out, asymmetric(32))
    with pytest.raises(ParamsError, match="augment.crop_scale"):
        parse_params(
            {"finetune": {"phases": [{"name": "a", "epochs": 1, "lr": 0.1}]}, "augment": {"crop_scale": [0.5, 1.5]}}
        )


def test_random_erasing_and_per_image_draws_in_a_batch():
    white = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    erased = train_transform(Augment(**STILL, random_erasing=1.0))(white)
    assert (erased == 0).any() and (erased == 255).any()
    torch.manual_seed(0)
    batch = augment_batch(train_transform(Augment(rotation=45.0)), asymmetric().expand(8, 3, 16, 16))
    assert batch.shape == (8, 3, 16, 16)
    assert len({tuple(image.flatten().tolist()) for image in batch}) == 8  # eight different rotations


def test_oversampling_evens_classes_and_keeps_every_image():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    index = oversampled_index(labels, seed=0)
    assert np.bincount(labels[index]).tolist() == [10, 10, 10]
    assert set(index.tolist()) == set(range(len(labels)))  # nothing dropped
    assert np.bincount(index)[:10].tolist() == [1] * 10  # the largest class is not repeated
    assert np.bincount(index, minlength=14)[10:13].min() == 3  # 3 images to 10: each at least 3 times
    assert np.array_equal(index, oversampled_index(labels, seed=0))


def test_training_dataset_uses_the_balanced_index_when_the_cache_has_one(tmp_path):
    images = create_images(tmp_path, "train", 4, 8)
    images[:] = np.arange(4, dtype=np.uint8)[:, None, None, None]
    images.flush()
    del images
    labels = np.array([0, 0, 0, 1])
    save_labels(tmp_path, "train", labels)
    plain = training_dataset(tmp_path)
    assert len(plain) == 4 and [plain[i][1] for i in range(4)] == [0, 0, 0, 1]
    save_train_index(tmp_path, oversampled_index(labels, seed=0))
    balanced = training_dataset(tmp_path)
    served = [balanced[i] for i in range(len(balanced))]
    assert [label for _, label in served] == [0, 0, 0, 1, 1, 1]
    assert all(int(image[0, 0, 0]) == 3 for image, label in served if label == 1)  # the same picture, repeated


def test_preview_grid_shows_augmented_training_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    preview_grid(images, train_transform(Augment()), 9, tmp_path / "preview.png", seed=0)
    with Image.open(tmp_path / "preview.png") as picture:
        assert picture.size == ((3 * (16 + 2) + 2) * 16,) * 2  # 3x3 tiles with 2 px padding, upscaled 16x


def test_an_augment_param_reruns_augment_and_what_follows_only(tiny_pipeline, tmp_path):
    project = copy_project(tiny_pipeline, tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["augment"]["rotation"] = 5.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc(project, "repro", "augment").stdout) == ["augment"]  # validate, split: cached
    # the cache is the same, so features stays up to date; finetune (then evaluate) trains with the new policy
    assert set(json.loads(dvc(project, "status", "--json").stdout)) == {"finetune"}
