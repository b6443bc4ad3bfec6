"""A training step between two non-finite checks never waits for the device.

A host synchronisation stalls the CPU until the GPU has caught up, so the next step's launches no
longer overlap the current step's work. The real BYOLTrial (Determined's local-mode context) runs
steps between two checks (``finite_check_period`` far beyond them) under torch.profiler on the CPU:
no ``aten::item`` / ``aten::_local_scalar_dense`` (a read of a device value) and no
``aten::nonzero`` (a data-dependent size, read back on CUDA) may appear, nor a Python-level read
(``.tolist()``, ``bool(t)``, ...: :class:`HostReads`), and ``train_batch`` returns no tensor (the
harness would ``.cpu()`` it). A step that ends a check period does read (the
positive control: the profile sees syncs). On CUDA, ``torch.cuda.set_sync_debug_mode("error")``
turns any synchronisation over 20 steps into an error.
"""
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

from model_def import BYOLTrial
from runtime import launch
from runtime.settings import parse_settings

SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
BATCH = 8
NO_PHOTOMETRIC = {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}


@pytest.fixture(scope="module", params=["photometric ops off", "paper views"])
def trial_step(request, tmp_path_factory):
    """A function running one real trial step, on CUDA when there is one. "photometric ops off"
    leaves out augment.PhotometricAugment's per-op plans (``nonzero`` over the CPU-side parameter
    draws, until the mask-based augmentation of issue 16 item 3 lands); "paper views" is table 6."""
    directory = tmp_path_factory.mktemp("syncs")
    hparams = {"backbone": "small_cnn", "image_size": 16, "global_batch_size": BATCH, "projection_size": 8,
               "projection_hidden_size": 16, "train_length": {"batches": 1000}, "classifier_validation": False,
               "finite_check_period": 1000}
    if request.param == "photometric ops off":
        hparams["augmentation"] = {"view1": NO_PHOTOMETRIC, "view2": NO_PHOTOMETRIC}
    data = {"dataset": "digits", "root": str(directory / "data"), "num_workers": 0}
    settings = parse_settings(hparams, data)
    with launch.local_trial_context(hparams, {"hyperparameters": hparams, "data": data}, None,
                                    str(directory / "checkpoints")) as context:
        trial = BYOLTrial(context, settings)
        trial.model.train()
        torch.manual_seed(0)
        images = torch.randint(0, 256, (BATCH, 3, 16, 16), dtype=torch.uint8)
        labels = torch.randint(0, 10, (BATCH,))
        if trial.device.type == "cuda":  # as the training loader delivers them (loaders.py)
            images, labels = images.pin_memory(), labels.pin_memory()
        batch = ((images, images.flip(-1)), labels)

        def step():
            context._current_batch_idx = trial.global_step  # what the harness's loop sets before a step
            return trial.train_batch(batch, 0, trial.global_step)

        step.trial, step.kind = trial, request.param
        yield step


class HostReads(TorchFunctionMode):
    """Python-level reads of tensor values (``.tolist()``, ``.item()``, ``bool(t)``, ``float(t)``,
    ``.cpu()``, ``.numpy()``, formatting): on the CPU some never reach an aten op the profiler sees."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__",
             "__repr__", "nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.found.append(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


def syncs_in(run) -> list:
    """What ``run`` does that would make the host wait for the device."""
    reads = HostReads()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, reads:
        run()
    return [event.name for event in profile.events() if event.name in SYNCS] + reads.found


def test_steps_between_checks_do_not_synchronise(trial_step):
    for _ in range(2):  # first steps: momentum buffers, LARS's trust-ratio buffers
        trial_step()
    trial = trial_step.trial
    assert not trial.finite_watch.due(trial.global_step + 2)
    returned = []
    found = syncs_in(lambda: returned.extend(trial_step() for _ in range(3)))
    assert found == [], f"host synchronisations in steps between checks: {sorted(set(found))}"
    for metrics in returned:
        assert not any(isinstance(value, torch.Tensor) for value in metrics.values()), metrics
        assert {"lr", "tau", "images_per_second"} <= set(metrics)
    # the positive control: a step that ends a check period reads the device
    period = trial.finite_watch.period
    trial.finite_watch.period = trial.global_step + 1
    try:
        assert "Tensor.tolist" in syncs_in(trial_step)
    finally:
        trial.finite_watch.period = period
    read_step, read_loss = trial.finite_watch.last_read
    assert read_step == trial.global_step - 1 and torch.isfinite(torch.tensor(read_loss))


def test_device_metrics_reach_the_reducer(trial_step):
    reducer = trial_step.trial.step_metrics
    reducer.reset()
    for _ in range(2):
        trial_step()
    rows = reducer.per_slot_reduce()
    assert len(rows) == 2 and all(len(row) == 3 for row in rows)
    means = reducer.cross_slot_reduce([rows])
    assert set(means) == {"loss", "online_classifier_accuracy", "online_classifier_loss"}
    assert 0.0 <= means["online_classifier_accuracy"] <= 1.0 and means["online_classifier_loss"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the sync debug mode checks CUDA streams")
def test_no_synchronisation_on_cuda_over_20_steps(trial_step):
    assert trial_step.trial.device.type == "cuda"
    for _ in range(2):
        trial_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            trial_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert os.environ.get("CUDA_LAUNCH_BLOCKING") != "1"
