"""Tests of backbone.py: the encoder registry (section 3.3 / appendix A), CIFAR stems and weights
loaded from local files."""
import pytest
import torch
import torchvision
from torch import nn

import backbone
from backbone import BACKBONES, build_backbone, check_backbone_name, feature_size


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_gives_feature_vectors(name):
    torch.manual_seed(0)
    net = build_backbone(name).eval()
    size = 16 if name.endswith("_cifar") else 32
    with torch.no_grad():
        features = net(torch.randn(2, 3, size, size))
    assert features.shape == (2, feature_size(name))
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet50_cifar"])
def test_cifar_variants_have_small_stem_and_no_maxpool(name):
    net = build_backbone(name)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert isinstance(net.fc, nn.Identity)
    plain = build_backbone(name.replace("_cifar", ""))
    assert plain.conv1.kernel_size == (7, 7) and plain.conv1.stride == (2, 2)
    assert isinstance(plain.maxpool, nn.MaxPool2d)
    # no down-sampling in the stem: layer1 keeps the input resolution
    feature_maps = []
    net.layer1.register_forward_hook(lambda _m, _i, output: feature_maps.append(output.shape[-1]))
    with torch.no_grad():
        net.eval()(torch.randn(1, 3, 8, 8))
    assert feature_maps == [8]


def test_unknown_backbone_lists_names():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet19")
    message = str(info.value)
    assert "'resnet19'" in message
    assert all(name in message for name in BACKBONES)
    with pytest.raises(ValueError, match="resnet19"):
        check_backbone_name("resnet19")
    with pytest.raises(ValueError, match="small_cnn"):
        feature_size("resnet19")


def test_weights_from_a_local_file_load(tmp_path):
    torch.manual_seed(1)
    source = build_backbone("small_cnn")
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param))
    path = tmp_path / "small.pt"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("small_cnn", str(path))
    for (key, expected), (other_key, value) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert key == other_key and torch.equal(expected, value), key
    # a {'state_dict': ...} checkpoint works too
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": source.state_dict()}, wrapped)
    assert torch.equal(build_backbone("small_cnn", str(wrapped)).features[0].weight, source.features[0].weight)


def test_torchvision_checkpoint_with_classifier_loads(tmp_path):
    torch.manual_seed(2)
    resnet = torchvision.models.resnet18()  # keeps its fc layer, as a downloaded checkpoint does
    path = tmp_path / "resnet18.pt"
    torch.save(resnet.state_dict(), path)
    loaded = build_backbone("resnet18", str(path))
    assert torch.equal(loaded.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    assert isinstance(loaded.fc, nn.Identity)


def test_mismatching_weights_give_clear_value_error(tmp_path):
    small = tmp_path / "small.pt"
    torch.save(build_backbone("small_cnn").state_dict(), small)
    with pytest.raises(ValueError) as info:
        build_backbone("resnet18", str(small))
    assert str(small) in str(info.value) and "resnet18" in str(info.value) and "missing" in str(info.value)

    # same keys, different shapes: the ImageNet stem does not fit the CIFAR variant
    imagenet = tmp_path / "imagenet_stem.pt"
    torch.save(torchvision.models.resnet18().state_dict(), imagenet)
    with pytest.raises(ValueError) as info:
        build_backbone("resnet18_cifar", str(imagenet))
    assert str(imagenet) in str(info.value) and "conv1.weight" in str(info.value)

    not_a_state_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_state_dict)
    with pytest.raises(ValueError, match="state_dict"):
        build_backbone("small_cnn", str(not_a_state_dict))


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_backbone("small_cnn", str(tmp_path / "absent.pt"))


def test_registry_feature_sizes_match_specs():
    assert backbone.SmallConvNet(8).feature_size == 64
    assert feature_size("resnet50") == 2048 and feature_size("resnet18_cifar") == 512
