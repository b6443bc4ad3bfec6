"""Tests of optim.py: LARS with the paper's exclusions and the learning-rate schedule (section 3.3,
appendix C of Grill et al. 2020)."""
import copy
import math

import pytest
import torch
from foreach_rules import fast_path_violations, recorded_foreach_calls
from torch import nn

from optim import LARS, apply_schedule, cosine_schedule, is_excluded, lars_param_groups, scaled_learning_rate
from utils import InputError


def lars_update_by_hand(w, g, m, lr, momentum, wd, eta, adapt=True):
    """One LARS step on plain Python lists; returns (new w, new m)."""
    g = [gi + wd * wi for gi, wi in zip(g, w)]
    if adapt:
        w_norm = math.sqrt(sum(x * x for x in w))
        g_norm = math.sqrt(sum(x * x for x in g))
        if w_norm > 0 and g_norm > 0:
            g = [gi * eta * w_norm / g_norm for gi in g]
    m = [momentum * mi + gi for mi, gi in zip(m, g)]
    w = [wi - lr * mi for wi, mi in zip(w, m)]
    return w, m


def test_lars_trust_ratio_two_steps_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    optimizer = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.01)
    # step 1, g = [1, 0]: g + wd w = [1.3, 0.4]; ||w|| = 5; trust = 0.01 * 5 / sqrt(1.85)
    trust = 0.05 / math.sqrt(1.85)
    expected = [3.0 - 0.5 * 1.3 * trust, 4.0 - 0.5 * 0.4 * trust]
    w.grad = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(w.detach()[0], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(optimizer.state[w]["momentum_buffer"][0],
                               torch.tensor([1.3 * trust, 0.4 * trust], dtype=torch.float64))
    # step 2 uses the momentum buffer
    by_hand_w, by_hand_m = lars_update_by_hand([3.0, 4.0], [1.0, 0.0], [0.0, 0.0], 0.5, 0.9, 0.1, 0.01)
    by_hand_w, by_hand_m = lars_update_by_hand(by_hand_w, [-2.0, 0.5], by_hand_m, 0.5, 0.9, 0.1, 0.01)
    w.grad = torch.tensor([[-2.0, 0.5]], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(w.detach()[0], torch.tensor(by_hand_w, dtype=torch.float64))
    torch.testing.assert_close(optimizer.state[w]["momentum_buffer"][0], torch.tensor(by_hand_m, dtype=torch.float64))


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2),
    )


def test_lars_param_groups_excludes_biases_and_batch_norm():
    model = small_model()
    groups = lars_param_groups(model.named_parameters(), weight_decay=1e-4)
    adapted, excluded = groups
    assert adapted["lars_adaptation"] is True and adapted["weight_decay"] == 1e-4
    assert excluded["lars_adaptation"] is False and excluded["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(adapted["params"]) == ids([model[0].weight, model[4].weight])
    assert ids(excluded["params"]) == ids([model[0].bias, model[1].weight, model[1].bias, model[4].bias])
    assert is_excluded("fc.bias", nn.Parameter(torch.zeros(2, 2)))
    assert not is_excluded("fc.weight", nn.Parameter(torch.zeros(2, 2)))


def test_lars_param_groups_skip_frozen_parameters():
    model = small_model()
    model[0].weight.requires_grad_(False)
    adapted, _ = lars_param_groups(model.named_parameters(), weight_decay=1e-4)
    assert [id(p) for p in adapted["params"]] == [id(model[4].weight)]


def test_lars_step_on_model_adapts_weights_only():
    torch.manual_seed(0)
    model = small_model().double()
    lr, momentum, wd, eta = 0.3, 0.9, 0.05, 0.002
    optimizer = LARS(lars_param_groups(model.named_parameters(), wd), lr=lr, momentum=momentum,
                     weight_decay=wd, eta=eta)
    # batch-norm weights start at 1 and biases at 0; move them so that decay would show
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, param in model.named_parameters():
        param.grad = grads[name].clone()
    optimizer.step()
    for name, param in model.named_parameters():
        w, g = before[name].flatten().tolist(), grads[name].flatten().tolist()
        excluded = name in ("0.bias", "1.weight", "1.bias", "4.bias")
        if excluded:  # plain momentum SGD: no weight decay, no trust ratio
            expected, _ = lars_update_by_hand(w, g, [0.0] * len(w), lr, momentum, 0.0, eta, adapt=False)
        else:
            expected, _ = lars_update_by_hand(w, g, [0.0] * len(w), lr, momentum, wd, eta, adapt=True)
        torch.testing.assert_close(param.detach().flatten(), torch.tensor(expected, dtype=torch.float64),
                                   msg=f"parameter {name}")
    # the adapted step is tiny (trust ratio 0.002 * ||w|| / ||g||) compared with the raw gradient step
    step = (before["4.weight"] - model[4].weight.detach()).norm()
    assert step == pytest.approx(lr * eta * before["4.weight"].norm().item(), rel=1e-6)


def test_lars_zero_norm_parameter_and_zero_gradient():
    zero = nn.Parameter(torch.zeros(2, 2))
    still = nn.Parameter(torch.tensor([[1.0, 2.0]]))
    optimizer = LARS([zero, still], lr=0.1, momentum=0.9, weight_decay=0.0, eta=1e-3)
    zero.grad = torch.tensor([[1.0, -2.0], [0.0, 4.0]])
    still.grad = torch.zeros(1, 2)
    optimizer.step()
    # ||w|| = 0: trust ratio 1, a plain step; ||g|| = 0: no change, and no NaN anywhere
    torch.testing.assert_close(zero.detach(), torch.tensor([[-0.1, 0.2], [0.0, -0.4]]))
    torch.testing.assert_close(still.detach(), torch.tensor([[1.0, 2.0]]))
    assert torch.isfinite(optimizer.state[still]["momentum_buffer"]).all()


def test_lars_skips_parameters_without_gradient_and_rejects_bad_settings():
    param = nn.Parameter(torch.ones(2, 2))
    optimizer = LARS([param], lr=0.1)
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.ones(2, 2))
    with pytest.raises(ValueError, match="lr=-1"):
        LARS([param], lr=-1)
    with pytest.raises(ValueError, match="eta=0"):
        LARS([param], lr=0.1, eta=0)


def warmup_cosine_lr(step, total, warmup, peak):
    return cosine_schedule(step, total, peak, 0.0, warmup)


def test_warmup_cosine_lr():
    peak, total, warmup = 2.0, 110, 10
    assert warmup_cosine_lr(0, total, warmup, peak) == 0.0
    assert warmup_cosine_lr(5, total, warmup, peak) == pytest.approx(1.0)
    assert warmup_cosine_lr(warmup, total, warmup, peak) == pytest.approx(peak)
    assert warmup_cosine_lr(60, total, warmup, peak) == pytest.approx(peak / 2)
    assert warmup_cosine_lr(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_lr(total + 50, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    # decay is monotone and without restarts
    values = [warmup_cosine_lr(k, total, warmup, peak) for k in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # no warm-up: starts at the peak
    assert warmup_cosine_lr(0, 100, 0, peak) == pytest.approx(peak)
    assert warmup_cosine_lr(50, 100, 0, peak) == pytest.approx(peak / 2)


def test_scaled_learning_rate_and_apply_schedule():
    assert scaled_learning_rate(0.2, 4096) == pytest.approx(3.2)
    assert scaled_learning_rate(0.2, 256) == pytest.approx(0.2)
    assert scaled_learning_rate(1.0, 128) == pytest.approx(0.5)
    model = small_model()
    optimizer = LARS(lars_param_groups(model.named_parameters(), 1e-6, peak_lr=0.8), lr=0.1)
    assert [group["lr"] for group in optimizer.param_groups] == [0.8, 0.8]  # the groups' own peak
    assert apply_schedule(optimizer, 5, 110, warmup_steps=10) == pytest.approx(0.4)
    assert [group["lr"] for group in optimizer.param_groups] == [pytest.approx(0.4)] * 2
    optimizer.param_groups[1]["initial_lr"] = 0.2  # each group follows its own peak
    apply_schedule(optimizer, 60, 110, warmup_steps=10)
    assert [group["lr"] for group in optimizer.param_groups] == [pytest.approx(0.4), pytest.approx(0.1)]
    without_peak = LARS(lars_param_groups(model.named_parameters(), 1e-6), lr=0.1)
    with pytest.raises(InputError, match="initial_lr"):
        apply_schedule(without_peak, 0, 10)


def test_schedule_without_steps_is_its_start():
    assert cosine_schedule(0, 0, 0.7) == 0.7 and cosine_schedule(3, 0, 0.996, 1.0) == 0.996


def lars_step_one_tensor_at_a_time(optimizer: LARS) -> None:
    """The per-tensor LARS update (the form in LARS's docstring, as optim.py computed it before
    its multi-tensor rewrite): the reference the ``torch._foreach_*`` version must equal."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            grad = param.grad
            if group["weight_decay"]:
                grad = grad.add(param, alpha=group["weight_decay"])
            if group["lars_adaptation"]:
                param_norm, grad_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(grad)
                trust = torch.where((param_norm > 0) & (grad_norm > 0), group["eta"] * param_norm / grad_norm,
                                    torch.ones_like(param_norm))
                grad = grad * trust
            state = optimizer.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.clone(grad).detach()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
            param.data.add_(state["momentum_buffer"], alpha=-group["lr"])


def mixed_model() -> nn.Module:
    """Parameters of three dtypes in both LARS groups, and a channels_last convolution."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.Flatten(),
                          nn.Linear(12, 2), nn.Linear(2, 2))
    model[0].to(memory_format=torch.channels_last)
    model[1].bfloat16()
    model[2].bfloat16()
    model[4].double()
    return model


# Float rounding of each dtype; bfloat16 (8 bits of mantissa, ulp 2^-7 relative at most) drifts by a
# few ulps over the steps, as the multi-tensor ops round in their own order.
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-14),
             torch.bfloat16: dict(rtol=5 * 2 ** -7, atol=1e-2)}


@pytest.mark.parametrize("build", [small_model, mixed_model], ids=["float32", "mixed dtypes"])
def test_multi_tensor_lars_equals_the_per_tensor_update(build):
    torch.manual_seed(3)
    models = [build(), build()]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [LARS(lars_param_groups(m.named_parameters(), 1e-2), lr=0.7, momentum=0.9, weight_decay=1e-2,
                       eta=1e-3) for m in models]
    models[0][1].bias.requires_grad_(False)  # a parameter that never gets a gradient
    models[1][1].bias.requires_grad_(False)
    for step in range(4):
        grads = [torch.randn_like(p) * (step + 1) for p in models[0].parameters()]
        if step == 2:
            grads[0].zero_()  # zero gradient norm: trust ratio 1
        for model in models:
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone() if param.requires_grad else None
        with torch.no_grad():
            optimizers[0].step()
            lars_step_one_tensor_at_a_time(optimizers[1])
        for ours, reference in zip(models[0].parameters(), models[1].parameters()):
            assert ours.dtype == reference.dtype and ours.stride() == reference.stride()
            torch.testing.assert_close(ours, reference, **TOLERANCE[ours.dtype])
        for param, other in zip(models[0].parameters(), models[1].parameters()):
            if param in optimizers[0].state:
                torch.testing.assert_close(optimizers[0].state[param]["momentum_buffer"],
                                           optimizers[1].state[other]["momentum_buffer"], **TOLERANCE[param.dtype])


def test_lars_calls_stay_on_the_multi_tensor_fast_path(monkeypatch):
    """ATen's fast-path rules (tests/foreach_rules.py) hold for every ``_foreach_`` call of LARS as
    it runs on CUDA (trust ratios spread to the gradients' shapes, forced here on the CPU), with
    mixed dtypes, a channels_last weight and gradients missing, on the first step (new momentum
    buffers) and later ones; the checker itself flags the trust ratios paired as 0-d tensors."""
    monkeypatch.setattr(LARS, "spreads_trust_ratios", staticmethod(lambda device: True))
    torch.manual_seed(0)
    model = mixed_model()
    model[5].bias.requires_grad_(False)
    optimizer = LARS(lars_param_groups(model.named_parameters(), 1e-2), lr=0.5, weight_decay=1e-2)
    for _ in range(2):
        for param in model.parameters():
            param.grad = torch.randn_like(param) if param.requires_grad else None
        with recorded_foreach_calls() as calls:
            optimizer.step()
        names = {name for name, _, _ in calls}
        assert {"_foreach_norm", "_foreach_mul_", "_foreach_add_"} <= {n.split(".")[0] for n in names}, names
        assert fast_path_violations(calls) == []
    params = [p for p in model.parameters() if p.dtype == torch.float32]
    trust = torch.ones(len(params))
    with recorded_foreach_calls() as calls:
        torch._foreach_mul([p.detach() for p in params], list(trust.unbind()))
    assert any("pairs sizes" in line for line in fast_path_violations(calls))
    with recorded_foreach_calls() as calls:
        torch._foreach_copy_([torch.zeros(2), torch.zeros((), dtype=torch.int64)], [torch.ones(2), torch.ones(())])
    assert any("mixes" in line for line in fast_path_violations(calls))


def test_lars_on_the_cpu_scales_by_0d_ratios_with_the_same_update(monkeypatch):
    """On the CPU (no fast path to keep) LARS multiplies each gradient by its 0-d trust ratio and
    keeps no buffer of spread ratios; the update equals the spread (CUDA) form's; the decayed
    gradients g + wd * w go into the same buffers every step (no parameter-sized allocation)."""
    torch.manual_seed(0)
    first = mixed_model()
    models = [first, copy.deepcopy(first)]
    optimizers = [LARS(lars_param_groups(m.named_parameters(), 1e-2), lr=0.5, weight_decay=1e-2) for m in models]
    seen = None
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model in models:
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
        optimizers[0].step()
        with monkeypatch.context() as patch:
            patch.setattr(LARS, "spreads_trust_ratios", staticmethod(lambda device: True))
            optimizers[1].step()
        for ours, spread in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(ours, spread, rtol=0, atol=0)
        for param, grad in zip(models[0].parameters(), grads):
            assert torch.equal(param.grad, grad), "the step changed a parameter's .grad"
        pointers = [t.data_ptr() for tensors in optimizers[0]._decayed.values() for t in tensors]
        assert pointers and pointers == (seen or pointers)
        seen = pointers
    assert optimizers[0]._trust_buffers == {} and optimizers[1]._trust_buffers
