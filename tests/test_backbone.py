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


# --------------------------------------------------------------- initialisation (backbone.INITIALISATIONS)
# haiku's TruncatedNormal(stddev) cuts a standard normal at +-2 and does not rescale it: the sample
# standard deviation is that of the cut normal, 0.8796 (scipy.stats.truncnorm.std(-2, 2)), times stddev.
CUT_NORMAL_STD = 0.87962566103423978


def fan_in(weight: torch.Tensor) -> int:
    return weight[0].numel()


def check_truncated_fan_in(weight: torch.Tensor, name: str) -> None:
    """Sample std within 5% (3% for large tensors) of 0.8796/sqrt(fan_in), nothing beyond 2 std, mean ~0."""
    std = 1.0 / fan_in(weight) ** 0.5
    tolerance = 0.03 if weight.numel() >= 20000 else 0.05 if weight.numel() >= 4000 else 0.15
    assert weight.std().item() == pytest.approx(CUT_NORMAL_STD * std, rel=tolerance), name
    assert weight.abs().max().item() <= 2 * std * (1 + 1e-6), name
    assert abs(weight.mean().item()) < 4 * std / weight.numel() ** 0.5 + 1e-7, name


def batch_norms(net: nn.Module):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_reference_initialisation_is_the_authors(name):
    torch.manual_seed(0)
    net = build_backbone(name)  # init="reference" by default
    for layer_name, layer in net.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            check_truncated_fan_in(layer.weight.detach(), layer_name)
            assert layer.bias is None or not layer.bias.any(), layer_name
    zeros = [n for n, m in batch_norms(net) if not m.weight.any()]
    # haiku's BlockV1 zeroes batchnorm_2 of bottleneck blocks only: ResNet-50 has 16, ResNet-18 none
    expected = ([f"layer{g}.{b}.bn3" for g, blocks in enumerate((3, 4, 6, 3), 1) for b in range(blocks)]
                if name.startswith("resnet50") else [])
    assert zeros == expected
    for norm_name, norm in batch_norms(net):
        assert not norm.bias.any(), norm_name
        if norm_name not in expected:
            assert torch.equal(norm.weight, torch.ones_like(norm.weight)), norm_name


def test_torchvision_initialisation_is_kept_as_an_option():
    torch.manual_seed(0)
    net = build_backbone("resnet50", init="torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.resnet50(weights=None)
    assert all(torch.equal(a, b) for (key, a), b in zip(net.state_dict().items(), plain.state_dict().values())
               if not key.startswith("fc."))
    conv = net.layer4[0].conv2.weight  # torchvision: kaiming normal, fan_out, ReLU gain
    assert conv.std().item() == pytest.approx((2.0 / (conv.shape[0] * 9)) ** 0.5, rel=0.03)
    assert not any(not m.weight.any() for _, m in batch_norms(net))  # no zero-init residual scale
    with pytest.raises(ValueError, match="unknown initialisation 'kaiming'; known: reference, torchvision"):
        build_backbone("small_cnn", init="kaiming")


def test_initialisation_is_a_pure_function_of_the_seed():
    states = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        states.append(build_backbone("resnet18_cifar").state_dict())
    assert all(torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values()))
    assert not torch.equal(states[0]["conv1.weight"], states[2]["conv1.weight"])
