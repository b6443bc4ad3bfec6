"""Reliability (issue 11): every bad input is one clear line before any work, and a stopped run keeps
its work. One section per class of case: bad config, bad data, bad checkpoint, bad path, signals, a
frozen peer, storage faults. docs/reliability.md lists the cases with what the user sees."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_result
import model_def
import utils
from run_helpers import PYTHON, ROOT, command, environment, straight_run, write_config
from runtime import checkpoints
from runtime import settings as settings_module
from runtime.settings import parse_settings
from utils import ConfigError

DIGITS = {"dataset": "digits", "root": "data", "validation_size": 50, "num_workers": 0}


def run_main(main, argv, capsys):
    """``(exit code, stdout, stderr)`` of a command's main in this process."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles, exit_code=2):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == exit_code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ----------------------------------------------------------------------------- bad config
def test_unknown_top_level_section_is_refused(tmp_path, capsys):
    path = write_config(str(tmp_path))
    text = re.sub(r"^data:", "datasets:", open(path).read(), flags=re.M)
    assert "datasets:" in text
    open(path, "w").write(text)
    code, out, err = run_main(model_def.main, ["--config", path], capsys)
    assert_one_line_error(code, err, "'datasets'", "did you mean 'data'")
    assert "[train]" not in out
    # every section Determined's experiment schema has is accepted
    schema = json.load(open("/work/shared/determined-schemas/expconf/v0/experiment.json")) \
        if os.path.exists("/work/shared/determined-schemas/expconf/v0/experiment.json") else None
    if schema:
        assert sorted(schema["properties"]) == sorted(settings_module.EXPERIMENT_SECTIONS)


@pytest.mark.parametrize("value, accepted", [(float("nan"), False), (float("inf"), False), ("1e-1", True),
                                             ("fast", False)])
def test_base_lr_finite_and_yaml11_exponents(value, accepted):
    if accepted:
        assert parse_settings({"base_lr": value}, DIGITS).base_lr == pytest.approx(0.1)
    else:
        with pytest.raises(ConfigError, match="base_lr"):
            parse_settings({"base_lr": value}, DIGITS)


def test_set_overrides_are_checked_and_lengths_replaced(capsys, tmp_path):
    hparams = {"checkpoint_period": {"epochs": 20}}
    settings_module.apply_overrides(hparams, {}, ["checkpoint_period.batches=10"])
    assert hparams["checkpoint_period"] == {"batches": 10}  # replaced, not merged
    with pytest.raises(ConfigError, match="not both"):
        parse_settings({"checkpoint_period": {"epochs": 20, "batches": 10}}, DIGITS)
    path = write_config(str(tmp_path))
    code, _, err = run_main(model_def.main, ["--config", path, "--set", "base_lr=[0.1"], capsys)
    assert_one_line_error(code, err, "'[0.1'", "not valid yaml")


@pytest.mark.parametrize("gcs, needle", [({"bucket": "gs://x"}, "data.gcs.bucket"),
                                         ({"max_in_flight": 0}, "data.gcs.max_in_flight"),
                                         ({"retry_deadline": -1}, "data.gcs.retry_deadline")])
def test_bad_cloud_storage_settings(gcs, needle):
    section = {"dataset": "imagenet", "gcs": {"bucket": "b", "train_blob_list": "t", "val_blob_list": "v", **gcs}}
    with pytest.raises(ConfigError, match=needle):
        parse_settings({}, section)


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope.yaml")
    assert model_def.main(["--config", missing]) == 2
    monkeypatch.setenv(utils.DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="does not exist"):
        model_def.main(["--config", missing])
    monkeypatch.delenv(utils.DEBUG_ENV)
    with pytest.raises(ConfigError):
        model_def.main(["--config", missing, "--debug"])


# ----------------------------------------------------------------------------- bad data
def image_folder(root, classes=("a", "b"), per_class=6, val_classes=None):
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for name in names:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                pixels = np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    return root


def custom_config(tmp_path, root, **hparams):
    data = {"dataset": "custom", "root": str(root), "validation_size": 2, "num_workers": 0}
    return write_config(str(tmp_path), data=data, **{"global_batch_size": 4, **hparams})


@pytest.mark.parametrize("case", ["bad_val_image", "bomb", "val_class", "validation_size", "batch"])
def test_bad_data_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch, case):
    root = image_folder(str(tmp_path / "images"), val_classes=("a", "b", "zebra") if case == "val_class" else None)
    hparams = {}
    if case == "bad_val_image":
        bad = os.path.join(root, "val", "b", "3.png")
        open(bad, "wb").write(b"not an image at all")
        needles = [bad, "cannot be opened as an image"]
    elif case == "bomb":
        bad = os.path.join(root, "val", "a", "1.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # a small limit: no 180 Mpx file needed
        Image.new("L", (200, 200)).save(bad)  # 40000 px > 2 x the limit: PIL's DecompressionBombError
        needles = [bad, "decompression bomb"]
    elif case == "val_class":
        needles = ["'zebra'", "training folder lacks"]
    elif case == "validation_size":
        hparams = {}
        needles = ["validation_size", "12 labelled"]
    else:
        hparams = {"global_batch_size": 64}
        needles = ["global_batch_size", "fewer than one global batch"]
    path = custom_config(tmp_path, root, **hparams)
    if case == "validation_size":
        text = open(path).read().replace("validation_size: 2", "validation_size: 12")
        open(path, "w").write(text)
    code, out, err = run_main(model_def.main, ["--config", path, "--checkpoint-dir", str(tmp_path / "ck")], capsys)
    assert_one_line_error(code, err, *needles)
    assert "[train]" not in out


def test_one_class_dataset_is_warned_about(tmp_path):
    import data
    from runtime import preflight

    root = image_folder(str(tmp_path / "images"), classes=("only",))
    assert data.dataset_info("custom", root).num_classes == 1
    assert "trivially" in preflight.dataset_classes_note(1, "dataset 'custom'")
    assert preflight.dataset_classes_note(2, "x") == ""


# ----------------------------------------------------------------------------- bad checkpoint
def fake_checkpoint(directory, backbone="small_cnn"):
    """A complete checkpoint (marker written) in the harness's format holding an online encoder."""
    import backbone as backbones

    torch.manual_seed(1)
    net = backbones.build_backbone(backbone)
    state = {f"online_encoder.net.{k}": v for k, v in net.state_dict().items()}
    os.makedirs(directory, exist_ok=True)
    torch.save({"models_state_dict": [state]}, os.path.join(directory, checkpoints.STATE_FILE))
    hparams = {"backbone": backbone, "training_mode": "SELF_SUPERVISED", "image_size": 8}
    with open(os.path.join(directory, "load_data.json"), "w") as handle:
        json.dump({"hparams": hparams, "experiment_config": {"hyperparameters": hparams, "data": DIGITS}}, handle)
    checkpoints.write_complete_marker(str(directory), 3)
    return str(directory)


def flip_bit(path):
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x40]))


def truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage, needle", [(flip_bit, "SHA-256 mismatch"), (truncate, "bytes"),
                                            (lambda p: os.remove(os.path.join(os.path.dirname(p),
                                                                              checkpoints.COMPLETE_FILE)),
                                             "no byol_complete.json")])
@pytest.mark.parametrize("reader", ["export", "features", "linear"])
def test_every_checkpoint_reader_verifies_the_marker(tmp_path, capsys, damage, needle, reader):
    directory = fake_checkpoint(tmp_path / "ck")
    good_out = tmp_path / "good.pt"
    if reader == "export":  # intact: works
        assert evaluate_result.main(["--checkpoint", directory, "--export-encoder", str(good_out)]) == 0
    damage(os.path.join(directory, checkpoints.STATE_FILE))
    capsys.readouterr()
    argv = {"export": ["--checkpoint", directory, "--export-encoder", str(tmp_path / "enc.pt")],
            "features": ["features", "--checkpoint", directory, "--out", str(tmp_path / "f.pt")],
            "linear": ["--checkpoint", directory, "--classifier-train-epochs", "1"]}[reader]
    code, out, err = run_main(evaluate_result.main, argv, capsys)
    assert_one_line_error(code, err, needle, directory)
    assert not (tmp_path / "enc.pt").exists() and not (tmp_path / "f.pt").exists()


def test_pretrained_checkpoint_and_backbone_weights_are_verified(tmp_path):
    import backbone as backbones

    directory = fake_checkpoint(tmp_path / "ck")
    flip_bit(os.path.join(directory, checkpoints.STATE_FILE))
    settings = parse_settings({"training_mode": "CLASSIFIER_ONLY", "pretrained_checkpoint": directory}, DIGITS)
    with pytest.raises(checkpoints.IncompleteCheckpointError, match="SHA-256"):
        checkpoints.load_pretrained_encoder(backbones.build_backbone("small_cnn"), settings)
    payload = tmp_path / "weights.pt"
    torch.save({"x": torch.nn.Linear(2, 2)}, payload)  # a module: code, not tensors
    with pytest.raises(utils.InputError, match=f"backbone weights file '{payload}'"):
        backbones.build_backbone("small_cnn", str(payload))


@pytest.mark.slow
def test_resume_with_changed_settings_or_no_work_is_refused(tmp_path, capsys):
    config, ckpt_dir, _ = straight_run(1)
    last = checkpoints.complete_checkpoints(ckpt_dir)[-1][1]  # step 4
    out_dir = str(tmp_path / "ck")
    for extra, needles in ((["--set", "seed=7", "--set", "global_batch_size=64"], ["seed=7", "global_batch_size=64"]),
                           (["--batches", "3"], ["global step 4", "ends at step 3", "past the end"])):
        code, out, err = run_main(model_def.main, ["--config", config, "--checkpoint-dir", out_dir,
                                                "--resume-from", last, *extra], capsys)
        assert_one_line_error(code, err, *needles)
        assert "[train]" not in out
    code, out, err = run_main(model_def.main, ["--config", config, "--checkpoint-dir", out_dir, "--resume-from", last,
                                            "--batches", "5"], capsys)
    assert code == 0, err
    assert "longer than the one that wrote the checkpoint (5 steps, was 4)" in out
    code, out, err = run_main(model_def.main, ["--config", config, "--checkpoint-dir", out_dir, "--resume-from", last,
                                            "--batches", "4"], capsys)
    assert code == 0 and "nothing to train, validating only" in out, err


# ----------------------------------------------------------------------------- bad path
def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    path = write_config(str(tmp_path))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for argv, needle in ((["--metrics-out", str(blocker / "m.json")], "--metrics-out"),
                         (["--checkpoint-dir", str(blocker)], "--checkpoint-dir"),
                         (["--metrics-out", str(tmp_path)], "is a directory")):
        code, out, err = run_main(model_def.main, ["--config", path, *argv], capsys)
        assert_one_line_error(code, err, needle, str(blocker) if "is a directory" not in needle else str(tmp_path))
        assert "[train]" not in out and "[byol]" not in out
    directory = fake_checkpoint(tmp_path / "ck")
    code, _, err = run_main(evaluate_result.main, ["--checkpoint", directory, "--export-encoder", str(tmp_path)],
                            capsys)
    assert_one_line_error(code, err, "--export-encoder", "is a directory")
    code, _, err = run_main(evaluate_result.main, ["features", "--checkpoint", directory,
                                                   "--out", str(blocker / "f.pt")], capsys)
    assert_one_line_error(code, err, "--out", str(blocker))
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage, then the error line
        evaluate_result.main(["features", "--checkpoint", directory, "--out", str(tmp_path / "f.pt"),
                              "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size must be >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- signals
def start(args, nproc, tmp_path, **env):
    """A training run in its own process group; its output goes to files."""
    out, err = open(tmp_path / "out.log", "w"), open(tmp_path / "err.log", "w")
    return subprocess.Popen(command(args, nproc), cwd=ROOT, env={**environment(nproc), **env}, stdout=out,
                            stderr=err, start_new_session=True)


def wait_for(process, path, needle, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in path.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before {needle!r}: {path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {needle!r} after {timeout} s")


def group_gone(pgid, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("nproc, signum", [(1, signal.SIGTERM), (2, signal.SIGINT)])
def test_signal_finishes_the_step_checkpoints_and_exits(tmp_path, nproc, signum):
    data = {"dataset": "digits", "root": str(tmp_path / "data"), "validation_size": 50, "num_workers": 2}
    config = write_config(str(tmp_path), data=data, train_length={"batches": 2000}, checkpoint_period=None)
    ckpt = tmp_path / "ck"
    process = start(["--config", config, "--checkpoint-dir", str(ckpt)], nproc, tmp_path)
    try:
        wait_for(process, tmp_path / "out.log", "[train] step 1/")
        if nproc == 1:
            os.kill(process.pid, signum)
        else:
            os.killpg(process.pid, signum)  # a terminal's Ctrl-C reaches the whole process group
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    err = (tmp_path / "err.log").read_text()
    assert process.returncode != 0, err
    assert f"stopped by {signal.Signals(signum).name} after global step" in err, err
    assert err.count("error: stopped by") == 1, err  # rank 0 speaks for all processes
    # no traceback through this project's code (torchrun, torch's launcher, prints its own on a signal)
    assert not re.search(rf'File "{re.escape(ROOT)}/(?!\.venv/)', err) and "KeyboardInterrupt" not in err, err
    found = checkpoints.complete_checkpoints(str(ckpt))
    assert len(found) == 1 and 0 < found[0][0] < 2000
    checkpoints.verify_checkpoint(found[0][1])
    assert f"--resume-from {found[0][1]}" in err
    assert group_gone(process.pid), "a process of the run (a data-loader worker?) outlived it"


SECOND_SIGNAL = textwrap.dedent("""
    import multiprocessing, os, signal, sys, time
    sys.path.insert(0, {root!r})
    from runtime import stops
    child = multiprocessing.Process(target=time.sleep, args=(600,))
    child.start()
    stops.REQUEST.install()
    print("ready", child.pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_second_signal_stops_at_once_and_ends_workers(tmp_path):
    script = tmp_path / "second.py"
    script.write_text(SECOND_SIGNAL.format(root=ROOT))
    process = subprocess.Popen([PYTHON, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = int(process.stdout.readline().split()[1])
    process.send_signal(signal.SIGTERM)
    time.sleep(3)  # past the repeat window: a new request
    assert process.poll() is None  # the first signal only asks
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)
    assert process.returncode == 128 + signal.SIGTERM
    err = process.stderr.read()
    assert "finishing the current step" in err and "stopping at once" in err
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{child}") or "zombie" in open(f"/proc/{child}/status").read().lower()


# ----------------------------------------------------------------------------- frozen peer
@pytest.mark.slow
def test_frozen_peer_ends_the_run_naming_its_rank(tmp_path):
    """Two gloo processes; rank 1 is stopped (SIGSTOP) mid-training: rank 0 ends after the collective
    timeout, naming rank 1, instead of waiting for ever."""
    from gcs_fixtures import free_port

    config = write_config(str(tmp_path), train_length={"batches": 2000}, checkpoint_period=None)
    port = str(free_port())
    processes = []
    for rank in (0, 1):
        env = {**environment(2), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "BYOL_COLLECTIVE_TIMEOUT": "5"}
        out, err = open(tmp_path / f"out{rank}.log", "w"), open(tmp_path / f"err{rank}.log", "w")
        processes.append(subprocess.Popen([PYTHON, os.path.join(ROOT, "model_def.py"), "--config", config,
                                           "--checkpoint-dir", str(tmp_path / "ck")], cwd=ROOT, env=env,
                                          stdout=out, stderr=err))
    try:
        wait_for(processes[0], tmp_path / "out0.log", "[train] step 1/")
        time.sleep(1)
        processes[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        processes[0].wait(timeout=120)
        waited = time.monotonic() - stopped_at
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    err = (tmp_path / "err0.log").read_text()
    assert processes[0].returncode == 1, err
    assert_one_line_error(1, err, "BYOL_COLLECTIVE_TIMEOUT=5 s", "rank(s) [1] did not answer", exit_code=1)
    assert waited < 60


# ----------------------------------------------------------------------------- storage faults
@pytest.mark.slow
def test_unreachable_endpoint_fails_fast_with_progress(tmp_path, monkeypatch, capsys):
    import logging

    import generate_blob_list as gbl
    from gcs_fixtures import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens
    caplog_lines = []
    handler = logging.Handler()
    handler.emit = lambda record: caplog_lines.append(record.getMessage())
    logging.getLogger("runtime.gcs_client").addHandler(handler)
    try:
        started = time.monotonic()
        code = gbl.main(["--bucket", "b", "--output", str(tmp_path / "list.txt"), "--retry-deadline", "3"])
        took = time.monotonic() - started
    finally:
        logging.getLogger("runtime.gcs_client").removeHandler(handler)
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "cannot list gs://b/", "3 s of retries", exit_code=1)
    assert took < 30
    assert any(line.startswith("retrying gs://b/ (2nd try") for line in caplog_lines), caplog_lines


@pytest.mark.slow
def test_cache_write_failure_names_object_and_cache_path(imagenet_bucket, gcs_env, tmp_path):
    from runtime.gcs import GCSError, GCSImageFolder

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / imagenet_bucket.name).write_text("a file where the bucket's folder goes")
    ds = GCSImageFolder(imagenet_bucket.name, imagenet_bucket.train_list, cache_dir=str(cache))
    url = ds.object_url(0)
    with pytest.raises(GCSError, match=f"cannot write the cache copy of {url} to '{cache}/"):
        ds[0]


@pytest.mark.slow
def test_failing_object_is_retried_with_progress_lines(imagenet_bucket, fault_proxy, caplog):
    from runtime.gcs import GCSError, GCSImageFolder

    ds = GCSImageFolder(imagenet_bucket.name, imagenet_bucket.train_list,
                        retry_initial_delay=0.01, retry_deadline=1.0, timeout=5.0)
    fault_proxy.set_faults(error_rate=1.0)
    url = ds.object_url(2)
    with caplog.at_level("WARNING", logger="runtime.gcs_client"):
        with pytest.raises(GCSError, match=f"giving up on {url} .*1 s \\(data.gcs.retry_deadline\\)"):
            ds[2]
    assert any(f"retrying {url} (2nd try, 503" in message for message in caplog.messages), caplog.messages
