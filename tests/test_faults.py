"""Faults end a run with one clear error and leave the previous checkpoint usable: a non-finite loss,
an unreadable image, a training process that dies, a full disk while checkpointing."""
import math
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from run_helpers import ROOT, at_step, command, complete, environment, load, straight_run, train, write_config
from runtime import checkpoints, faults
from runtime.sampling import SeededTransformDataset
from utils import one_line


def _assert_only_good_checkpoints(directory):
    names = sorted(os.listdir(directory))
    assert names, f"no checkpoint left in {directory}"
    for name in names:
        checkpoints.verify_checkpoint(os.path.join(directory, name))  # raises for a partial one
    return [step for step, _ in complete(directory)]


@pytest.mark.slow
def test_non_finite_loss_stops_at_once_naming_step_and_last_good_checkpoint(tmp_path):
    config = write_config(str(tmp_path), base_lr=1.0e+30, warmup_epochs=0.1, train_length={"batches": 6})
    result = train(["--config", config, "--checkpoint-dir", str(tmp_path / "ck")], check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: loss is not finite"), error
    step = int(error.split("at global step ")[1].split(":")[0])
    assert 1 <= step < 6
    steps = _assert_only_good_checkpoints(str(tmp_path / "ck"))
    assert steps == list(range(1, step + 1))  # stopped at once: nothing after the bad step
    last_good = at_step(str(tmp_path / "ck"), step)
    assert last_good in error
    state = load(last_good)
    assert all(torch.isfinite(t).all() for t in state["models_state_dict"][0].values() if t.is_floating_point())


def test_non_finite_weights_are_never_checkpointed():
    good = {"models_state_dict": [{"w": torch.ones(2), "steps": torch.tensor(3)}]}
    checkpoints.check_finite(good, 5)
    bad = {"models_state_dict": [{"w": torch.tensor([1.0, float("inf")])}]}
    with pytest.raises(checkpoints.NonFiniteWeightsError, match="'w' are not finite after global step 5"):
        checkpoints.check_finite(bad, 5)


def _image_folder(root, corrupt: str = "truncated"):
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    bad = root / "train" / "b" / "7.png"
    if corrupt == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad.write_bytes(b"not an image at all")
    return bad


@pytest.mark.parametrize("corrupt", ["truncated", "garbage"])
def test_read_guard_names_the_file_through_worker_processes(tmp_path, corrupt):
    import torchvision

    bad = _image_folder(tmp_path, corrupt)
    folder = torchvision.datasets.ImageFolder(str(tmp_path / "train"), transform=None)
    dataset = faults.ReadGuard(SeededTransformDataset(torch.utils.data.Subset(folder, list(range(32))[::-1]),
                                                      torchvision.transforms.PILToTensor()))
    assert len(dataset) == 32 and dataset[0][1] == 1
    loader = DataLoader(dataset, batch_size=8, num_workers=1)
    with pytest.raises(faults.UnreadableImageError) as info:
        list(loader)
    message = one_line(info.value)
    assert message.startswith(f"cannot read image file {str(bad)!r}: "), message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.slow
def test_unreadable_image_ends_the_run_naming_the_file(tmp_path):
    bad = _image_folder(tmp_path / "images")
    data = {"dataset": "custom", "root": str(tmp_path / "images"), "validation_size": 4, "num_workers": 1}
    # 28 pretraining images: the 4 of CLS_VALIDATION are held out of pretraining (BYOL-loss validation).
    config = write_config(str(tmp_path), data=data, train_length={"batches": 2}, global_batch_size=16)
    result = train(["--config", config, "--checkpoint-dir", str(tmp_path / "ck")], check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: cannot read image file {str(bad)!r}"), error
    assert "no complete checkpoint was written" in error and not os.listdir(tmp_path / "ck")


def _child_with_rank(parent: int, rank: str, timeout: float = 60) -> int:
    """The torchrun worker process of ``parent`` whose environment has RANK=``rank``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    env = handle.read().split(b"\0")
            except OSError:
                continue
            if ppid == parent and f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under process {parent}")


@pytest.mark.slow
def test_dead_training_process_ends_the_run_and_leaves_a_usable_checkpoint(tmp_path):
    config = write_config(str(tmp_path), train_length={"batches": 400}, checkpoint_period={"batches": 2})
    ckpt = tmp_path / "ck"
    process = subprocess.Popen(command(["--config", config, "--checkpoint-dir", str(ckpt)], nproc=2), cwd=ROOT,
                               env=environment(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not complete(str(ckpt)) and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert complete(str(ckpt)), "no checkpoint was completed"
        os.kill(_child_with_rank(process.pid, "1"), signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0
    assert "exitcode: -9" in stderr or "SIGKILL" in stderr, stderr[-3000:]
    # Rank 0 may have been stopped while writing a checkpoint: such a directory never verifies.
    newest_step, newest = complete(str(ckpt))[-1]
    for name in os.listdir(ckpt):
        path = str(ckpt / name)
        if os.path.islink(path):  # the aliases latest / step-NNNNNN name complete checkpoints only
            assert os.path.realpath(path) in [os.path.realpath(p) for _, p in complete(str(ckpt))], name
            continue
        if path not in [p for _, p in complete(str(ckpt))]:
            with pytest.raises(checkpoints.IncompleteCheckpointError):
                checkpoints.verify_checkpoint(path)
    checkpoints.verify_checkpoint(newest)
    # ... and the newest complete one continues (here in one process).
    result = train(["--config", config, "--checkpoint-dir", str(tmp_path / "continued"), "--resume-from", newest,
                    "--batches", str(newest_step + 1)])
    assert f"[byol] finished {newest_step + 1} steps" in result.stdout
    assert [step for step, _ in complete(str(tmp_path / "continued"))] == [newest_step + 1]


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -Urm and tmpfs mounts (user namespaces)")
def test_full_disk_while_checkpointing(tmp_path):
    """A real full filesystem: a tmpfs (in a private mount namespace) with room for one checkpoint."""
    config, straight, _ = straight_run(1)  # same model sizes: tells how big one checkpoint is
    size = 0
    for folder, _, files in os.walk(at_step(straight, 1)):
        size += sum(-(-os.path.getsize(os.path.join(folder, f)) // 4096) * 4096 for f in files) + 4096
    volume, kept = tmp_path / "volume", tmp_path / "kept"
    volume.mkdir()
    ckpt = volume / "ck"
    run = " ".join(f"'{part}'" for part in command(["--config", config, "--checkpoint-dir", str(ckpt)]))
    script = (f"mount -t tmpfs -o size={int(size * 1.6)} tmpfs '{volume}' && {{ {run}; rc=$?; "
              f"df -k '{volume}' >&2; cp -a '{ckpt}' '{kept}'; exit $rc; }}")
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=ROOT, env=environment(1),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")][-1]
    assert error.startswith("error: writing checkpoint") and "No space left on device" in error, error
    assert "The incomplete checkpoint" in error and "was removed" in error
    assert _assert_only_good_checkpoints(str(kept)) == [1]
    first = at_step(str(kept), 1)
    assert f"--resume-from {os.path.join(ckpt, os.path.basename(first))}" in error
    assert math.isfinite(float(load(first)["models_state_dict"][0]["online_encoder.net.features.0.weight"].sum()))


def test_non_finite_loss_is_found_on_any_rank():
    from runtime import nonfinite

    for value, expected in ((1.5, []), (float("nan"), [(0, 7)]), (float("-inf"), [(0, 7)])):
        watch = nonfinite.NonFiniteWatch(period=5)
        watch.record(torch.tensor(value), 7)
        assert watch.agree(0, 1)[0] == expected
