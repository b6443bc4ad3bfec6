"""The hot path's switches (performance.py, nonfinite.py, reducers.DeviceMeansReducer,
loaders.prefetch_to_device) run on CPU and give finite results close to the plain float32 path."""
import copy
import math

import pytest
import torch
from torch import nn

from byol import BYOL
from reducers import DeviceMeansReducer
from run_helpers import load, metrics, train, write_config  # noqa: F401  (sys.path)
from runtime import loaders, nonfinite, performance
from runtime.settings import parse_settings
from utils import ConfigError


def small_learner() -> BYOL:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    return BYOL(net, image_size=16, hidden_layer=None, projection_size=8, projection_hidden_size=32)


def views(batch: int = 8):
    torch.manual_seed(1)
    return torch.randn(batch, 3, 16, 16), torch.randn(batch, 3, 16, 16)


def test_bf16_autocast_on_cpu_gives_a_float32_loss_close_to_fp32():
    learner = small_learner()
    v1, v2 = views()
    reference = learner(v1, v2)
    with performance.autocast(torch.device("cpu"), "bf16"):
        loss = learner(v1, v2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - reference.item()) < 0.05
    loss.backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
               for p in learner.parameters())
    assert isinstance(performance.autocast(torch.device("cpu"), "fp32"), type(__import__("contextlib").nullcontext()))
    with pytest.raises(ValueError, match="fp8"):
        performance.autocast(torch.device("cpu"), "fp8")


def test_channels_last_gives_the_contiguous_result():
    learner = small_learner()
    other = performance.to_channels_last(copy.deepcopy(learner))
    assert other.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    v1, v2 = views()
    expected = learner(v1, v2)
    got = other(performance.images_channels_last(v1), performance.images_channels_last(v2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert performance.use_channels_last(None, torch.device("cpu")) is True
    assert performance.use_channels_last(None, torch.device("meta")) is False
    assert performance.use_channels_last(None, torch.device("cuda")) is True
    assert performance.use_channels_last(True, torch.device("cpu")) is True


def test_compiled_forward_gives_the_eager_result():
    # The learner through dynamo and AOT autograd (the graph capture torch.compile does; the
    # "aot_eager" backend skips inductor's C++ code generation, minutes on this CPU).
    learner = small_learner()
    compiled = performance.maybe_compile(copy.deepcopy(learner), True, backend="aot_eager")
    v1, v2 = views()
    loss = compiled(v1, v2)
    torch.testing.assert_close(loss, learner(v1, v2), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert performance.maybe_compile(learner, False) is learner


@pytest.mark.slow
def test_inductor_compiles_a_forward_on_cpu():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    compiled = performance.maybe_compile(copy.deepcopy(head), True)
    x = torch.randn(6, 8)
    torch.testing.assert_close(compiled(x), head(x), rtol=1e-4, atol=1e-4)


def test_thread_choice_never_oversubscribes():
    choice = performance.choose_threads(workers=2, processes=1, cores=2, environment={})
    assert (choice.workers, choice.threads) == (2, 1)  # the measured 2.1x case: 1 intra-op thread
    choice = performance.choose_threads(workers=4, processes=2, cores=2, environment={})
    assert (choice.workers, choice.threads) == (1, 1)
    choice = performance.choose_threads(workers=0, processes=1, cores=16, environment={})
    assert (choice.workers, choice.threads) == (0, 16)
    choice = performance.choose_threads(workers=2, processes=1, cores=8, environment={"OMP_NUM_THREADS": "3"})
    assert choice.threads == 3 and "OMP_NUM_THREADS" in choice.describe()
    assert "2 data-loader worker(s)" in choice.describe()


def test_new_settings_are_checked(tmp_path):
    data = {"dataset": "digits", "root": str(tmp_path)}
    settings = parse_settings({"precision": "bf16", "channels_last": True, "compile": True,
                               "finite_check_period": 10}, data)
    assert (settings.precision, settings.channels_last, settings.compile, settings.finite_check_period) == \
        ("bf16", True, True, 10)
    assert parse_settings({}, data).precision == "fp32"
    with pytest.raises(ConfigError, match="'hyperparameters.precision' has value 'fp16': allowed: fp32, bf16"):
        parse_settings({"precision": "fp16"}, data)
    with pytest.raises(ConfigError, match="finite_check_period"):
        parse_settings({"finite_check_period": 0}, data)
    with pytest.raises(ConfigError, match="channels_last"):
        parse_settings({"channels_last": "yes"}, data)
    with pytest.raises(ConfigError, match="'data.decode' has value 'device': draft and device decode JPEG"):
        parse_settings({}, {**data, "decode": "device"})


def test_non_finite_watch_names_the_first_bad_step_without_reading_every_step():
    watch = nonfinite.NonFiniteWatch(period=4)
    assert [step for step in range(10) if watch.due(step)] == [3, 7]
    assert watch.agree(0, 1)[0] == [] and watch.local_first_bad() is None
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
        watch.record(torch.tensor(value), step)
    assert watch.first_bad.device.type == "cpu" and watch.first_bad.dtype == torch.int64
    assert watch.local_first_bad() == 2 and watch.agree(0, 1)[0] == [(0, 2)]
    with pytest.raises(ValueError, match="finite_check_period must be >= 1"):
        nonfinite.NonFiniteWatch(0)


def test_device_means_reducer_reads_once_and_keeps_per_step_means():
    reducer = DeviceMeansReducer(("loss", "accuracy"))
    for value in (1.0, 3.0, 5.0):
        reducer.update(loss=torch.tensor(value, requires_grad=True) * 1, accuracy=torch.tensor(value / 10))
    slot0 = reducer.per_slot_reduce()
    assert [row[0] for row in slot0] == [1.0, 3.0, 5.0]  # one row per step
    assert [row[1] for row in slot0] == pytest.approx([0.1, 0.3, 0.5])
    assert reducer.cross_slot_reduce([slot0, [[3.0, 0.3], [5.0, 0.5], [7.0, 0.7]]]) == pytest.approx(
        {"loss": 4.0, "accuracy": 0.4})
    assert reducer.per_batch == [pytest.approx({"loss": 2.0, "accuracy": 0.2}),
                                 pytest.approx({"loss": 4.0, "accuracy": 0.4}),
                                 pytest.approx({"loss": 6.0, "accuracy": 0.6})]
    with pytest.raises(ValueError, match="differ"):
        reducer.update(loss=torch.tensor(1.0))
    reducer.reset()
    assert reducer.per_slot_reduce() == [] and math.isnan(reducer.cross_slot_reduce([[]])["loss"])


def test_prefetch_to_device_keeps_batches_and_order():
    batches = [((torch.full((2,), i), torch.full((2,), -i)), torch.tensor([i])) for i in range(3)]
    out = list(loaders.prefetch_to_device(iter(batches), torch.device("cpu")))
    assert len(out) == 3
    for (views, labels), ((v1, v2), expected) in zip(out, batches):
        assert torch.equal(views[0], v1) and torch.equal(views[1], v2) and torch.equal(labels, expected)


@pytest.mark.slow
def test_trial_runs_with_bf16_and_channels_last_on_cpu(tmp_path):
    config = write_config(str(tmp_path), precision="bf16", channels_last=True, finite_check_period=3,
                          train_length={"batches": 3}, checkpoint_period=None)
    result = train(["--config", config, "--checkpoint-dir", str(tmp_path / "ck"), "--metrics-out",
                    str(tmp_path / "m.json")], timeout=600)
    assert "[byol] finished 3 steps" in result.stdout, result.stdout[-2000:]
    assert math.isfinite(metrics(str(tmp_path / "m.json"))["validation_byol_loss"])


def test_compile_true_compiles_the_whole_step_once(tmp_path, monkeypatch):
    """``compile: true``: a real trial step's device part (both photometric views, the learner's
    forward and loss) is one compiled graph, with no graph break and no recompile on later steps
    (the "aot_eager" backend: dynamo and AOT autograd without inductor's code generation)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from model_def import BYOLTrial
    from runtime import launch

    monkeypatch.setattr(performance, "COMPILE_BACKEND", "aot_eager")
    hparams = {"backbone": "small_cnn", "image_size": 16, "global_batch_size": 8, "projection_size": 8,
               "projection_hidden_size": 16, "train_length": {"batches": 10}, "classifier_validation": False,
               "compile": True}
    data = {"dataset": "digits", "root": str(tmp_path / "data"), "num_workers": 0}
    generator = torch.Generator().manual_seed(0)
    with launch.local_trial_context(hparams, {"hyperparameters": hparams, "data": data}, None,
                                    str(tmp_path / "checkpoints")) as context:
        trial = BYOLTrial(context, parse_settings(hparams, data))
        torch._dynamo.reset()
        counters.clear()
        try:
            for step in range(3):
                images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=generator)
                context._current_batch_idx = step  # what the harness's loop sets before a step
                labels = torch.randint(0, 10, (8,), generator=generator)
                trial.train_batch(((images, images.flip(-1)), labels), 0, step)
                if step == 0:
                    first = (dict(counters["frames"]), dict(counters["stats"]))
            assert dict(counters["graph_break"]) == {}
            assert first == (dict(counters["frames"]), dict(counters["stats"]))  # nothing compiled after step 1
            assert counters["frames"]["ok"] == 1 and counters["stats"]["unique_graphs"] == 1
            assert trial.global_step == 3 and trial.finite_watch.local_first_bad() is None  # finite losses
        finally:
            torch._dynamo.reset()
