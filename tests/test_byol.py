"""Tests of byol.py: the BYOL loss (eq. 2 and 4), the EMA target (section 3.1), the tau schedule
(section 3.2) and the byol-pytorch-style wrapper around torchvision ResNets."""
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from foreach_rules import fast_path_violations, recorded_foreach_calls
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import byol
from byol import BYOL, ema_update, regression_loss
from optim import cosine_schedule


def tiny_net() -> nn.Module:
    """A small encoder whose output is the representation (hidden_layer=None)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def tiny_learner(**kwargs) -> BYOL:
    options = dict(hidden_layer=None, projection_size=6, projection_hidden_size=16)
    options.update(kwargs)
    return BYOL(tiny_net(), image_size=8, **options)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


# ------------------------------------------------------------------------------------- the loss
def test_regression_loss_matches_hand_values():
    prediction = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [-3.0, -4.0], [-5.0, 0.0]])
    expected = torch.tensor([2.0, 0.0, 2.0 - math.sqrt(2.0), 4.0, 4.0])
    torch.testing.assert_close(regression_loss(prediction, target), expected)
    # eq. 2 literally: squared distance of the l2-normalised vectors
    literal = (prediction / prediction.norm(dim=1, keepdim=True)
               - target / target.norm(dim=1, keepdim=True)).pow(2).sum(1)
    torch.testing.assert_close(regression_loss(prediction, target), literal)


def test_regression_loss_sends_no_gradient_to_the_target():
    prediction = torch.randn(5, 7, requires_grad=True)
    target = torch.randn(5, 7, requires_grad=True)
    regression_loss(prediction, target).sum().backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert target.grad is None


def test_forward_loss_is_symmetrised_2_minus_2cos_by_hand():
    torch.manual_seed(0)
    learner = tiny_learner()
    # make the target differ from the online network so that a wrong pairing would show
    with torch.no_grad():
        for param in learner.target_parameters():
            param.add_(0.3 * torch.randn_like(param))
    view1, view2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    loss = learner(view1, view2)

    with torch.no_grad():  # each view on its own (batch-norm statistics per view)
        q1, q2 = (learner.online_predictor(learner.online_projector(learner.online_encoder(v))) for v in (view1, view2))
        z1, z2 = (learner.target_projector(learner.target_encoder(v)) for v in (view1, view2))
    by_hand = ((2 - 2 * _cos(q1, z2)) + (2 - 2 * _cos(q2, z1))).mean()
    torch.testing.assert_close(loss.detach(), by_hand)
    wrong_pairing = ((2 - 2 * _cos(q1, z1)) + (2 - 2 * _cos(q2, z2))).mean()
    assert not torch.allclose(by_hand, wrong_pairing)
    # symmetric: swapping the views gives the same loss
    torch.testing.assert_close(learner(view2, view1).detach(), loss.detach())


def test_backward_reaches_online_but_never_target_parameters():
    learner = tiny_learner()
    for param in learner.target_parameters():
        assert not param.requires_grad
    learner(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)).backward()
    for param in learner.target_parameters():
        assert param.grad is None
    online = list(learner.online_parameters())
    assert online and all(p.requires_grad for p in online)
    assert all(p.grad is not None for p in online)
    assert any(p.grad.abs().sum() > 0 for p in learner.online_predictor.parameters())
    # the target network holds separate tensors, not the online ones
    online_ids = {id(p) for p in online}
    assert not online_ids & {id(p) for p in learner.target_parameters()}


# ----------------------------------------------------------------------------------- EMA target
def test_ema_update_formula_on_known_tensors():
    online, target = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        online.bias.copy_(torch.tensor([10.0, -10.0]))
        target.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
        target.bias.copy_(torch.tensor([0.0, 2.0]))
    ema_update(target, online, tau=0.9)
    torch.testing.assert_close(target.weight, torch.tensor([[0.1, 0.2], [1.2, -0.5]]))
    torch.testing.assert_close(target.bias, torch.tensor([1.0, 0.8]))
    torch.testing.assert_close(online.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # untouched
    ema_update(target, online, tau=1.0)  # tau = 1 freezes the target
    torch.testing.assert_close(target.bias, torch.tensor([1.0, 0.8]))
    ema_update(target, online, tau=0.0)  # tau = 0 copies the online network
    torch.testing.assert_close(target.weight, online.weight)


def test_ema_update_copies_batch_norm_statistics():
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    online(torch.randn(8, 3) * 5 + 2)
    ema_update(target, online, tau=0.99)
    torch.testing.assert_close(target.running_mean, online.running_mean)
    torch.testing.assert_close(target.running_var, online.running_var)


def ema_networks(mixed: bool):
    """An online network (running statistics and num_batches_tracked moved) and its target; ``mixed``:
    a bfloat16 and a float64 layer beside float32 ones, and a channels_last convolution."""
    torch.manual_seed(1)
    online = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3), nn.BatchNorm1d(3))
    online(torch.randn(5, 3, 4, 4))  # moves running statistics and num_batches_tracked
    if mixed:
        online[0].to(memory_format=torch.channels_last)
        online[3].bfloat16()
        online[4].double()
    target = __import__("copy").deepcopy(online)
    with torch.no_grad():
        for param in online.parameters():
            param.add_(torch.randn_like(param))
        for buffer in online.buffers():
            buffer.add_(1)
    return online, target


@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "mixed dtypes"])
def test_multi_tensor_ema_equals_the_update_one_tensor_at_a_time(mixed):
    online, target = ema_networks(mixed)
    expected_params = [t.lerp(o, 0.03) for t, o in zip(target.parameters(), online.parameters())]
    ema_update(target, online, tau=0.97)
    for ours, reference in zip(target.parameters(), expected_params):
        assert ours.dtype == reference.dtype and ours.stride() == reference.stride()
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    for ours, reference in zip(target.buffers(), online.buffers()):
        assert ours.dtype == reference.dtype and torch.equal(ours, reference)


def test_ema_calls_stay_on_the_multi_tensor_fast_path():
    """ATen's fast-path rules (tests/foreach_rules.py): one dtype per call (float statistics apart
    from int64 num_batches_tracked; bfloat16 and float64 layers apart), paired sizes and strides."""
    online, target = ema_networks(mixed=True)
    with recorded_foreach_calls() as calls:
        ema_update(target, online, tau=0.9)
    dtypes = {(name.split(".")[0], lists[0][0].dtype) for name, lists, _ in calls}
    assert {("_foreach_copy_", torch.int64), ("_foreach_copy_", torch.float32),
            ("_foreach_lerp_", torch.bfloat16), ("_foreach_lerp_", torch.float64)} <= dtypes, dtypes
    assert fast_path_violations(calls) == []


def test_update_moving_average_default_decay_and_explicit_tau():
    learner = tiny_learner(moving_average_decay=0.75)
    with torch.no_grad():
        for param in learner.online_parameters():
            param.add_(1.0)
    before = [p.clone() for p in learner.target_parameters()]
    online = [p.detach().clone() for p in
              list(learner.online_encoder.parameters()) + list(learner.online_projector.parameters())]
    learner.update_moving_average()
    for xi, old, theta in zip(learner.target_parameters(), before, online):
        torch.testing.assert_close(xi, 0.75 * old + 0.25 * theta)
    learner.update_moving_average(tau=0.0)
    for xi, theta in zip(learner.target_parameters(), online):
        torch.testing.assert_close(xi, theta)
    assert all(not p.requires_grad for p in learner.target_parameters())


def ema_tau(step: int, total: int, tau_base: float) -> float:
    """Section 3.2 as the paper writes it: tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2."""
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * step / total) + 1.0) / 2.0


def test_ema_tau_schedule_is_the_papers():
    assert cosine_schedule(0, 1000, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(500, 1000, 0.996, 1.0) == pytest.approx(1 - 0.004 / 2)
    assert cosine_schedule(1000, 1000, 0.996, 1.0) == pytest.approx(1.0)
    for step in (0, 1, 250, 777, 1000):
        assert cosine_schedule(step, 1000, 0.99, 1.0) == pytest.approx(ema_tau(step, 1000, 0.99), abs=1e-15)
    taus = [cosine_schedule(k, 100, 0.9, 1.0) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))


# ------------------------------------------------------------------- wrapping torchvision ResNets
@pytest.mark.parametrize("hidden_layer, sizes", [
    ("avgpool", {}),  # the README's defaults (projection 256, hidden 4096)
    (-2, {"projection_hidden_size": 256, "projection_size": 64}),
])
def test_wraps_resnet18_readme_example(hidden_layer, sizes):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    learner = BYOL(resnet, image_size=64, hidden_layer=hidden_layer, **sizes)
    assert learner.feature_size == 512
    opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    target_before = [p.clone() for p in learner.target_parameters()]
    images = torch.rand(4, 3, 64, 64)

    loss = learner(images)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    opt.step()
    opt.zero_grad()
    learner.update_moving_average()

    after = resnet.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])
    assert any(not torch.equal(a, b) for a, b in zip(target_before, learner.target_parameters()))
    # the improved plain encoder loads into a fresh torchvision ResNet-18
    fresh = torchvision.models.resnet18()
    fresh.load_state_dict(after)
    torch.testing.assert_close(fresh.conv1.weight, resnet.conv1.weight)
    assert learner(images, return_embedding=True).shape == (4, 512)


def test_literal_readme_example_with_resnet50():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50()
    learner = BYOL(resnet, image_size=64, hidden_layer="avgpool")
    opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
    before = resnet.conv1.weight.detach().clone()
    images = torch.randn(2, 3, 64, 64)
    loss = learner(images)
    loss.backward()
    opt.step()
    learner.update_moving_average()
    assert torch.isfinite(loss)
    assert not torch.equal(before, resnet.conv1.weight)
    torchvision.models.resnet50().load_state_dict(resnet.state_dict())


def test_optional_arguments_are_honoured():
    calls = []

    def aug1(images):
        calls.append("1")
        return images

    def aug2(images):
        calls.append("2")
        return images.flip(-1)

    learner = BYOL(torchvision.models.resnet18(), image_size=32, hidden_layer="avgpool", projection_size=24,
                   projection_hidden_size=40, moving_average_decay=0.5, augment_fn=aug1, augment_fn2=aug2)
    assert learner.online_projector[0].in_features == 512
    assert learner.online_projector[0].out_features == 40
    assert learner.online_projector[-1].out_features == 24
    assert learner.online_predictor[0].in_features == 24
    assert learner.online_predictor[-1].out_features == 24
    assert learner.target_projector[-1].out_features == 24
    assert learner.moving_average_decay == 0.5
    loss = learner(torch.rand(2, 3, 32, 32))
    assert sorted(calls) == ["1", "2"] and torch.isfinite(loss)

    # only augment_fn: used for both views
    calls.clear()
    learner = BYOL(tiny_net(), image_size=8, hidden_layer=None, projection_size=4, projection_hidden_size=8,
                   augment_fn=aug1)
    learner(torch.rand(2, 3, 8, 8))
    assert calls == ["1", "1"]


def test_learner_with_two_prepared_views():
    learner = BYOL(torchvision.models.resnet18(), image_size=32, hidden_layer="avgpool",
                   projection_hidden_size=64, projection_size=16)
    view1, view2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    loss = learner(view1, view2)
    loss.backward()
    assert 0.0 <= loss.item() <= 8.0  # each term of eq. 4 lies in [0, 4]
    assert learner.net.conv1.weight.grad is not None


def test_unknown_hidden_layer_lists_layers():
    with pytest.raises(ValueError) as info:
        BYOL(torchvision.models.resnet18(), image_size=32, hidden_layer="avg_pool")
    message = str(info.value)
    assert "avg_pool" in message and "avgpool" in message and "layer4" in message
    with pytest.raises(ValueError, match="out of range"):
        BYOL(torchvision.models.resnet18(), image_size=32, hidden_layer=42)


def test_train_helper_runs_on_a_tiny_dataloader():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.zeros(8, dtype=torch.long)), batch_size=4)
    learner = BYOL(tiny_net(), image_size=16, hidden_layer=None, projection_size=8, projection_hidden_size=16)
    optimizer = torch.optim.SGD(learner.online_parameters(), lr=0.1)
    target_before = [p.clone() for p in learner.target_parameters()]
    losses = byol.train(learner, loader, optimizer, epochs=2, log_every=0)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(a, b) for a, b in zip(target_before, learner.target_parameters()))

    # batches of prepared views: ((view1, view2), labels)
    views = TensorDataset(torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8))
    pairs = [((v1, v2), 0) for v1, v2 in views]
    loader = DataLoader(pairs, batch_size=3)
    learner = tiny_learner()
    losses = byol.train(learner, loader, torch.optim.SGD(learner.online_parameters(), lr=0.1), epochs=1,
                        log_every=0)
    assert len(losses) == 2 and all(0.0 <= x <= 8.0 for x in losses)


# ------------------------------------------------------------- per-view batch norm, no-bias outputs
def _normalising_learner(**kwargs) -> BYOL:
    """Encoder = flatten + batch norm without affine: its output is the input standardised with the
    statistics of whatever batch it is given."""
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(3 * 4 * 4, affine=False, eps=1e-12))
    return BYOL(net, image_size=4, hidden_layer=None, projection_size=6, projection_hidden_size=16,
                feature_size=48, **kwargs)


def _capture_representations(learner: BYOL) -> list:
    seen = []
    for name in ("online_encoder", "target_encoder"):
        getattr(learner, name).register_forward_hook(
            lambda module, inputs, output, name=name: seen.append((name, output)))
    return seen


def test_batch_norm_statistics_are_per_view_for_online_and_target():
    """View 2 is an affine map of view 1 (x -> 3x + 5). Both views go through each network as one
    batch of 2B, and with statistics per view the normalised representations of the two halves are
    the same, in the online and the target network; the same layers given the 2B batch outside the
    learner's two-view pass use 2B statistics (plain batch norm), and the halves differ by about 1.5
    standard deviations."""
    torch.manual_seed(0)
    learner = _normalising_learner()
    view1 = torch.randn(8, 3, 4, 4)
    seen = _capture_representations(learner)
    learner(view1, 3 * view1 + 5)
    assert [name for name, _ in seen] == ["online_encoder", "target_encoder"]  # one pass each
    for _, output in seen:
        assert output.shape[0] == 16 and torch.allclose(output[:8], output[8:], atol=1e-4)
    joint = learner.online_encoder(torch.cat([view1, 3 * view1 + 5]))
    assert (joint[:8] - joint[8:]).abs().mean() > 1.0


def separate_passes(learner: BYOL, view1: torch.Tensor, view2: torch.Tensor, labels=None):
    """The authors' order of work: each view through each network on its own (outside the learner's
    two-view pass the layers are plain batch norm), view 1 before view 2."""
    y1, y2 = learner.online_encoder(view1), learner.online_encoder(view2)
    p1 = learner.online_predictor(learner.online_projector(y1))
    p2 = learner.online_predictor(learner.online_projector(y2))
    with torch.no_grad():
        t1 = learner.target_projector(learner.target_encoder(view1))
        t2 = learner.target_projector(learner.target_encoder(view2))
    loss = (regression_loss(p1, t2) + regression_loss(p2, t1)).mean()
    if labels is None:
        return loss
    return (loss, *byol.online_classifier_loss(learner.online_classifier(y1.detach()), labels))


def _assert_same_training_state(ours: BYOL, reference: BYOL, tolerance: float) -> None:
    largest = max((float(p.grad.abs().max()) for p in reference.parameters() if p.grad is not None), default=0.0)
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:  # relative to the tensor's gradient (a bias before batch norm has ~0)
            scale = max(float(b.grad.abs().max()), 1e-2 * largest)
            torch.testing.assert_close(a.grad / scale, b.grad / scale, rtol=0, atol=tolerance, msg=name)
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance, msg=name)
    for (name, a), (_, b) in zip(ours.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)  # running stats: twice, in order


@pytest.mark.parametrize("network, dtype, tolerance", [
    ("small_cnn", torch.float64, 1e-10), ("resnet18", torch.float64, 1e-10), ("small_cnn", torch.float32, 1e-4),
])
def test_one_pass_of_both_views_equals_separate_passes(network, dtype, tolerance):
    """Section 3.1 with the reference's per-view batch norm: the loss, the online classifier, the
    gradient of every parameter and the running statistics after two training steps (SGD between,
    EMA after) are those of separate passes per view, to float rounding. (ResNet-18 in float32 at
    batch 6 and 32 px differs by up to 4e-3 of a gradient's scale: its last layers normalise 6 to 24
    values, which amplifies the rounding of convolutions summed over 2B instead of B images.)"""
    from backbone import SmallConvNet

    torch.manual_seed(0)
    if network == "small_cnn":
        net, size, layer, features = SmallConvNet(32), 16, None, 256
    else:
        net, size, layer, features = torchvision.models.resnet18(), 32, "avgpool", None
    ours = BYOL(net, image_size=size, hidden_layer=layer, feature_size=features, projection_size=16,
                projection_hidden_size=32, num_classes=3).to(dtype)
    with torch.no_grad():  # a target unlike the online network, and non-trivial batch-norm affine
        for param in ours.target_parameters():
            param.add_(0.05 * torch.randn_like(param))
        for module in ours.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5), module.bias.normal_(0, 0.1)
    reference = __import__("copy").deepcopy(ours)
    optimisers = [torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9) for learner in (ours, reference)]
    for _ in range(2):
        view1 = torch.randn(6, 3, size, size, dtype=dtype)
        view2 = 2 * torch.randn(6, 3, size, size, dtype=dtype) + 1   # statistics unlike view 1's
        labels = torch.tensor([0, 1, 2, -1, 1, 0])
        results = [ours(view1, view2, labels=labels), separate_passes(reference, view1, view2, labels)]
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
        for loss, classifier_loss, _ in results:
            (loss + classifier_loss).backward()
        _assert_same_training_state(ours, reference, tolerance)
        for learner, optimiser in zip((ours, reference), optimisers):
            optimiser.step()
            optimiser.zero_grad()
            learner.update_moving_average(0.9)
    _assert_same_training_state(ours, reference, tolerance)
    assert all(bn.num_batches_tracked == 4 for bn in ours.modules() if isinstance(bn, nn.BatchNorm2d))


def test_library_use_keeps_the_network_and_single_view_calls_are_plain_batch_norm():
    """``BYOL(resnet)`` changes the network's batch-norm layers in place (same modules, still
    ``nn.BatchNorm2d``, same state_dict keys); ``learner(images)`` augments and runs one pass per
    network; evaluation mode and ``return_embedding`` are plain batch norm."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    plain = __import__("copy").deepcopy(resnet)
    layer, keys = resnet.layer1[0].bn1, list(resnet.state_dict())
    learner = BYOL(resnet, image_size=32, hidden_layer="avgpool", projection_hidden_size=32, projection_size=8,
                   augment_fn=lambda images: images, augment_fn2=lambda images: images.flip(-1))
    assert resnet.layer1[0].bn1 is layer and isinstance(layer, nn.BatchNorm2d) and list(resnet.state_dict()) == keys
    images = torch.rand(4, 3, 32, 32)
    calls = []
    learner.target_encoder.register_forward_hook(lambda *args: calls.append(args[2].shape[0]))
    learner(images).backward()
    assert calls == [8]                                   # both views, one target pass
    plain.load_state_dict(resnet.state_dict())
    for mode in (True, False):                            # single-view calls equal a plain ResNet
        resnet.train(mode), plain.train(mode)
        embedding = learner(images, return_embedding=True)
        plain.fc = nn.Identity()
        torch.testing.assert_close(embedding, plain(images))
    torch.testing.assert_close(list(resnet.buffers()), list(plain.buffers()))


def test_per_view_layer_costs_two_plain_layers_of_host_work():
    """A per-view layer on both views (one process) runs torch's batch-norm kernel once per view:
    forward + backward at most twice the top-level aten ops of a plain nn.BatchNorm2d layer (9 here:
    the layer's kernel, the batch counter and backward, plus the loss and gradient bookkeeping)."""
    from batchnorm import per_view_batch_norm
    from run_helpers import batch_norm_layer_ops

    def ops(layer, views):
        return sum(batch_norm_layer_ops(layer, views).values())

    plain = ops(nn.BatchNorm2d(8), 1)
    assert ops(per_view_batch_norm(nn.BatchNorm2d(8)), 2) <= 2 * plain


def test_batch_counters_of_a_pass_advance_in_one_multi_tensor_add():
    """The num_batches_tracked counters of every per-view layer of a two-view pass advance by 2 in
    one ``_foreach_add_`` at the end of the pass (not one add per layer); a layer run twice in the
    pass counts twice; momentum=None layers (a cumulative average) count at once, as torch does."""
    from batchnorm import per_view_batch_norm, view_groups
    from run_helpers import top_level_aten_ops

    shared = nn.BatchNorm2d(4)
    net = per_view_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), shared,
                                            shared, nn.BatchNorm2d(4, momentum=None)))
    x = torch.randn(6, 3, 5, 5)

    def two_view_pass():
        with view_groups(2):
            net(x)

    ops = top_level_aten_ops(two_view_pass)
    # one _foreach_add_ per number of batches (2: each layer run once; 4: the layer run twice); the
    # two add_ are the momentum=None layer's, one per view
    assert ops["aten::_foreach_add_"] == 2 and ops["aten::add_"] == 2, ops
    assert [int(layer.num_batches_tracked) for layer in (net[1], shared, net[5])] == [2, 4, 2]


def test_batch_norm_layers_that_cannot_be_per_view_are_refused_by_name():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"'net.1' \(SyncBatchNorm\).*convert_sync_batchnorm"):
        BYOL(net, image_size=8, hidden_layer=None, feature_size=4, projection_size=4, projection_hidden_size=8)
    learner = tiny_learner()
    with pytest.raises(ValueError, match="same shape"):
        learner(torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8))


def test_projector_and_predictor_outputs_have_no_bias():
    learner = tiny_learner()
    for mlp in (learner.online_projector, learner.online_predictor, learner.target_projector):
        assert mlp[-1].bias is None and mlp[0].bias is not None


def test_online_classifier_trains_on_stopped_gradient_and_ignores_unlabelled():
    torch.manual_seed(0)
    learner = tiny_learner(num_classes=3)
    view1, view2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, -1, -1, 1])
    loss, classifier_loss, accuracy = learner(view1, view2, labels=labels)
    classifier_loss.backward()
    assert all(p.grad is None for p in learner.online_parameters())  # sg(y): nothing reaches BYOL
    assert learner.online_classifier.weight.grad.abs().sum() > 0
    with torch.no_grad():
        logits = learner.online_classifier(learner.online_encoder(view1))
    kept = labels >= 0
    expected = torch.nn.functional.cross_entropy(logits[kept], labels[kept])
    torch.testing.assert_close(classifier_loss.detach(), expected)
    assert accuracy == (logits[kept].argmax(1) == labels[kept]).float().mean()
    torch.manual_seed(0)
    plain = tiny_learner()
    torch.testing.assert_close(plain(view1, view2).detach(), loss.detach())  # same BYOL with or without it
    _, none_labelled, _ = learner(view1, view2, labels=torch.full((6,), -1))
    assert none_labelled == 0
    with pytest.raises(ValueError, match="num_classes"):
        plain(view1, view2, labels=labels)


PER_VIEW_SYNC_BN = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from torch import nn
    from byol import BYOL
    from runtime.sync_batchnorm import convert_sync_batchnorm
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(48, affine=False, eps=1e-12))
    learner = BYOL(net, image_size=4, hidden_layer=None, projection_size=6, projection_hidden_size=16,
                   feature_size=48)
    learner = convert_sync_batchnorm(learner, torch.device("cpu"))
    torch.manual_seed(1)
    view1 = torch.randn(8 * world, 3, 4, 4).chunk(world)[rank] + rank   # shards differ
    seen = []
    learner.online_encoder.register_forward_hook(lambda m, i, o: seen.append(o))
    learner(view1, 3 * view1 + 5)
    (y,) = seen                                        # both views in one pass
    # per-view statistics over the global batch: view 2's representation equals view 1's
    assert torch.allclose(y[:8], y[8:], atol=1e-4), "per view"
    # and they are global: the representation of this shard is not standardised on its own
    assert y[:8].mean(0).abs().max() > 0.1, "global statistics"
    open(f"{{sys.argv[1]}}/rank{{rank}}.ok", "w").write("ok")
""")


@pytest.mark.slow
def test_per_view_statistics_with_synchronised_batch_norm(tmp_path):
    from run_helpers import ROOT, run_on_two_ranks

    run_on_two_ranks(tmp_path, "per_view.py", PER_VIEW_SYNC_BN.format(root=ROOT))


@pytest.mark.slow
def test_readme_library_example_runs(tmp_path, monkeypatch):
    """The README's "Using the method as a library" example, as written, trains one step and saves
    the network (the default batched augmentation now lives in augment.py)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using the method as a library", 1)[1]
    example = section.split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "improved-net.pt").stat().st_size > 1_000_000


# ------------------------------------------------------------------------------- initialisation
def test_heads_start_as_the_authors_or_as_torch():
    """Projector, predictor and online classifier: haiku's hk.Linear default (truncated normal, std
    parameter 1/sqrt(fan_in), sample std 0.8796/sqrt(fan_in): 0.0194 at fan-in 2048) and zero biases;
    init="torchvision" keeps torch's (uniform +-1/sqrt(fan_in): std 0.0128 at 2048, non-zero biases)."""
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 2048))
    torch.manual_seed(0)
    learner = BYOL(encoder, image_size=2, hidden_layer=None, projection_size=64, projection_hidden_size=4096,
                   feature_size=2048, channels=3, num_classes=10)
    hidden, out = learner.online_projector[0], learner.online_projector[3]
    assert hidden.weight.std().item() == pytest.approx(0.87962566 / 2048 ** 0.5, rel=0.01)
    assert hidden.weight.abs().max().item() <= 2 / 2048 ** 0.5
    assert not hidden.bias.any() and out.bias is None
    assert out.weight.std().item() == pytest.approx(0.87962566 / 4096 ** 0.5, rel=0.02)
    assert learner.online_predictor[0].weight.std().item() == pytest.approx(0.87962566 / 64 ** 0.5, rel=0.01)
    assert not learner.online_classifier.bias.any()
    assert learner.online_classifier.weight.std().item() == pytest.approx(0.87962566 / 2048 ** 0.5, rel=0.05)
    assert torch.equal(learner.online_projector[1].weight, torch.ones(4096))
    for target, online in zip(learner.target_parameters(), learner.online_parameters()):
        assert torch.equal(target, online)
    assert torch.equal(encoder[1].weight, learner.net[1].weight)  # the encoder is used as given
    torch.manual_seed(0)
    torch_init = BYOL(nn.Sequential(nn.Flatten(), nn.Linear(12, 2048)), image_size=2, hidden_layer=None,
                      projection_size=64, projection_hidden_size=4096, feature_size=2048, num_classes=10,
                      init="torchvision")
    weight = torch_init.online_projector[0].weight
    assert weight.std().item() == pytest.approx(1 / (3 * 2048) ** 0.5, rel=0.01)
    assert torch_init.online_projector[0].bias.abs().max() > 0 and torch_init.online_classifier.bias.abs().max() > 0
    with pytest.raises(ValueError, match="unknown initialisation"):
        BYOL(encoder, image_size=2, hidden_layer=None, feature_size=2048, init="haiku")
