"""Inputs (issue 17, items 4-9): outputs never destroy inputs and are written atomically; configs that
would silently mean something else are refused (duplicate keys, environment variables, settings a
mode ignores); data that would train on the wrong thing (a file reached twice, 16-bit images);
limits checked before work (memory); one line instead of a traceback or a misleading message.
``tests/bad_inputs.py`` is the survey of the same classes through the commands."""
from __future__ import annotations

import errno
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

import augment
import data
import evaluate_result
import generate_blob_list
import model_def
import utils
from run_helpers import write_config
from runtime import checkpoints, gcs, loaders, performance, preflight
from runtime.settings import PRETRAINING_ONLY_KEYS, apply_overrides, load_config, mode_notes, parse_settings, parse_yaml
from utils import ConfigError, InputError

DIGITS = {"dataset": "digits", "root": "data", "validation_size": 50, "num_workers": 0}


def one_error_line(capsys, code, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A tiny digits config; the working directory beside the outputs (Determined copies the cwd)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path, write_config(str(tmp_path / "cfg"))


# ----------------------------------------------------------------------------- 4. outputs that are inputs
@pytest.mark.parametrize("how", ["same", "symlink", "dotdot", "inside", "hardlink"])
def test_an_output_that_is_or_lies_inside_an_input_is_refused(tmp_path, how):
    source = tmp_path / "in" / "config.yaml"
    source.parent.mkdir()
    source.write_text("x: 1\n")
    output = {"same": source, "dotdot": tmp_path / "in" / ".." / "in" / "config.yaml",
              "inside": tmp_path / "in" / "sub" / "m.json", "symlink": tmp_path / "link.json",
              "hardlink": tmp_path / "hard.json"}[how]
    if how == "symlink":
        output.symlink_to(source)
    if how == "hardlink":
        os.link(source, output)
    inputs = {"the config file": str(source) if how != "inside" else str(source.parent)}
    with pytest.raises(InputError, match="--metrics-out .* (is|lies inside) the config file"):
        utils.check_not_input(str(output), "--metrics-out", inputs)
    utils.check_not_input(str(tmp_path / "elsewhere.json"), "--metrics-out", inputs)  # not an input: fine
    assert source.read_text() == "x: 1\n"


def test_metrics_out_equal_to_the_config_is_refused_before_training(work, capsys):
    tmp_path, config = work
    before = open(config).read()
    code = model_def.main(["--config", config, "--batches", "1", "--checkpoint-dir", str(tmp_path / "ck"),
                           "--metrics-out", config])
    one_error_line(capsys, code, "--metrics-out", "config file")
    assert open(config).read() == before and not (tmp_path / "ck").exists()


def test_export_over_a_checkpoint_file_is_refused_and_leaves_it(tmp_path, capsys):
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    (checkpoint / "state_dict.pth").write_bytes(b"weights")
    for out in (checkpoint / "state_dict.pth", checkpoint / "sub" / "enc.pt"):
        code = evaluate_result.main(["--checkpoint", str(checkpoint), "--export-encoder", str(out)])
        one_error_line(capsys, code, "--export-encoder", "checkpoint read")
    assert sorted(os.listdir(checkpoint)) == ["state_dict.pth"]  # no folder made inside either
    assert (checkpoint / "state_dict.pth").read_bytes() == b"weights"


def test_inputs_of_a_config_name_every_file_it_reads():
    found = utils.inputs_of_config(
        {"backbone_weights": "w.pt", "pretrained_checkpoint": "ck", "classifier": {"label_list": "l.txt"}},
        {"dataset": "custom", "root": "/data", "gcs": {"train_blob_list": "t.txt", "val_blob_list": "gs://b/v"}},
        "c.yaml")
    assert set(found.values()) == {"w.pt", "ck", "l.txt", "/data", "t.txt", "gs://b/v", "c.yaml"}
    assert "data.root" not in utils.inputs_of_config({}, {"dataset": "digits", "root": "data"})  # not read


def test_a_full_disk_leaves_no_partial_file_and_says_where_the_results_are(tmp_path, monkeypatch, capsys):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": 1}')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.os, "fsync", full)
    with pytest.raises(utils.OutputWriteError, match="No space left on device.*in the summary above"):
        utils.write_json_atomically(str(target), {"new": 2}, "--metrics-out", "the results are in the summary above")
    assert json.loads(target.read_text()) == {"old": 1}  # the previous file, whole
    assert os.listdir(tmp_path) == ["metrics.json"]      # no temporary file left

    def body(argv):
        utils.write_json_atomically(str(tmp_path / "new.json"), {"a": 1}, "--metrics-out", "kept in checkpoint X")
    assert utils.run_command(body, []) == 1  # a fault, not bad input
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "kept in checkpoint X" in err and not (tmp_path / "new.json").exists()


def test_atomic_output_writes_the_whole_file(tmp_path):
    with utils.atomic_output(str(tmp_path / "a" / "f.pt"), "the file") as stream:
        torch.save({"w": torch.ones(3)}, stream)
    assert torch.equal(torch.load(tmp_path / "a" / "f.pt")["w"], torch.ones(3))
    assert os.listdir(tmp_path / "a") == ["f.pt"]


# ----------------------------------------------------------------------------- 5. configs that mean something else
@pytest.mark.parametrize("text, key", [
    ("seed: 1\nseed: 2\n", "seed"),
    ("hyperparameters: {seed: 1}\nname: x\nhyperparameters: {seed: 2}\n", "hyperparameters"),
    ("data:\n  gcs:\n    bucket: a\n    bucket: b\n", "bucket"),
    ("a: [{x: 1, x: 2}]\n", "x"),
])
def test_duplicate_yaml_keys_are_refused_at_any_depth(text, key):
    with pytest.raises(ConfigError, match=rf"config file 'f.yaml': key '{key}' is given twice .*lines \d+ and \d+"):
        parse_yaml(text, "config file 'f.yaml'")


def test_merge_keys_and_distinct_keys_are_accepted():
    assert parse_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", "f") == {
        "base": {"x": 1, "y": 2}, "other": {"x": 3, "y": 2}}


def test_duplicate_keys_in_a_file_and_in_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hyperparameters:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"'seed' is given twice in one mapping \(lines 2 and 3\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="'batch_size' is given twice"):
        apply_overrides({}, {}, ["classifier={batch_size: 8, batch_size: 9}"])


@pytest.mark.parametrize("name, value", [
    ("OMP_NUM_THREADS", "0"), ("OMP_NUM_THREADS", "abc"), ("BYOL_DEBUG", "maybe"), ("WORLD_SIZE", "two"),
    ("WORLD_SIZE", "0"), ("RANK", "x"), ("LOCAL_RANK", "-1"), ("BYOL_COLLECTIVE_TIMEOUT", "abc"),
    ("BYOL_COLLECTIVE_TIMEOUT", "0"), ("USE_TORCH_DISTRIBUTED", "maybe"), ("STORAGE_EMULATOR_HOST", "localhost:9023"),
    ("STORAGE_EMULATOR_HOST", "http://"), ("GROUP_RANK", "1.5"),
])
def test_every_environment_variable_is_checked(name, value):
    with pytest.raises(InputError, match=f"environment variable {name}="):
        utils.check_environment({name: value})


def test_a_rank_beyond_the_world_size_is_refused():
    with pytest.raises(InputError, match="RANK=2 is not below WORLD_SIZE=2"):
        utils.check_environment({"WORLD_SIZE": "2", "RANK": "2"})
    utils.check_environment({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "3",
                             "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023", "BYOL_DEBUG": "No"})


@pytest.mark.parametrize("value, debug", [("no", False), ("0", False), ("false", False), ("", False), ("yes", True),
                                          ("1", True), ("TRUE", True)])
def test_byol_debug_words(monkeypatch, capsys, value, debug):
    monkeypatch.setenv(utils.DEBUG_ENV, value)

    def body(argv):
        raise ConfigError("bad")
    if debug:
        with pytest.raises(ConfigError):
            utils.run_command(body, [])
    else:
        assert utils.run_command(body, []) == 2 and "error: bad" in capsys.readouterr().err


def test_omp_num_threads_zero_is_not_said_to_be_as_set():
    with pytest.raises(InputError, match="OMP_NUM_THREADS='0'"):
        performance.choose_threads(2, environment={"OMP_NUM_THREADS": "0"})
    assert performance.choose_threads(2, environment={"OMP_NUM_THREADS": "3"}).threads == 3


def test_settings_a_mode_ignores_are_refused_or_said():
    with pytest.raises(ConfigError, match="pretrained_checkpoint.*read only by CLASSIFIER_ONLY"):
        parse_settings({"pretrained_checkpoint": "ck"}, DIGITS)
    with pytest.raises(ConfigError, match="backbone_weights.*does nothing in CLASSIFIER_ONLY"):
        parse_settings({"training_mode": "CLASSIFIER_ONLY", "pretrained_checkpoint": "ck",
                        "backbone_weights": __file__}, DIGITS)
    heads = {"training_mode": "CLASSIFIER_ONLY", "pretrained_checkpoint": "ck", "tau_base": 0.9,
             "compare_random_init": True, "classifier": {"knn_k": 5, "encoder_lr": 0.1}}
    (note,) = mode_notes(heads, parse_settings(heads, DIGITS))
    assert all(key in note for key in ("tau_base", "compare_random_init", "classifier.knn_k", "classifier.encoder_lr"))
    pretraining = {"classifier_validation": False, "classifier": {"learning_rates": [0.1], "label_fraction": 0.1}}
    (note,) = mode_notes(pretraining, parse_settings(pretraining, DIGITS))
    assert "classifier.label_fraction" in note and "classifier.learning_rates" in note and "evaluate_result" in note
    assert mode_notes({}, parse_settings({}, DIGITS)) == []


def test_evaluation_runs_do_not_inherit_what_only_pretraining_reads():
    hparams = evaluate_result.evaluation_hparams(
        {"tau_base": 0.9, "base_lr": 1.0, "compare_random_init": True, "classifier": {"knn_k": 20}}, "ck", 1)
    assert not set(PRETRAINING_ONLY_KEYS) & set(hparams) and "knn_k" not in hparams["classifier"]
    assert hparams["compare_random_init"] is False
    assert mode_notes(hparams, parse_settings(hparams, DIGITS)) == []


@pytest.mark.parametrize("extra, message", [
    (["--fine-tune"], "--fine-tune would do nothing with --export-encoder"),
    (["--model-dir", "."], "--model-dir would do nothing"),
    (["--set", "seed=1"], "--set would do nothing"),
])
def test_export_refuses_flags_it_would_ignore(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        evaluate_result.main(["--checkpoint", str(tmp_path), "--export-encoder", str(tmp_path / "e.pt"), *extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. data that trains on the wrong thing
def image_folder(root, per_class=3):
    for split in ("train", "val"):
        for name in ("a", "b"):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                pixels = np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)


def build(root, split=data.Split.TRAIN):
    return data.build_dataset("custom", split, root=root, transform=None, validation_size=1)


def test_image_folders_keep_torchvision_order(tmp_path):
    root = image_folder(tmp_path / "img")
    os.makedirs(tmp_path / "img" / "train" / "a" / "nested")
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "train" / "a" / "nested" / "n.png")
    assert build(root).samples == torchvision.datasets.ImageFolder(os.path.join(root, "train")).samples


@pytest.mark.parametrize("loops", [1, 2])
def test_a_symlink_loop_is_refused_naming_the_paths(tmp_path, loops):
    root = image_folder(tmp_path / "img")
    target = os.path.join(root, "train", "a")
    for i in range(loops):  # two loops would make os.walk's walk grow as 2^depth
        os.symlink(target, os.path.join(target, f"loop{i}"))
    with pytest.raises(data.DuplicateImageError, match=r"loop0' is the folder .*train/a' again"):
        build(root)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_one_file_reached_twice_is_refused(tmp_path, link):
    root = image_folder(tmp_path / "img")
    (os.symlink if link == "symlink" else os.link)(os.path.join(root, "train", "a", "0.png"),
                                                   os.path.join(root, "train", "b", "copy.png"))
    with pytest.raises(data.DuplicateImageError, match=r"is the same file as .*train/(a/0|b/copy)\.png"):
        build(root)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_test_image_that_is_a_training_image_is_refused(tmp_path, link):
    root = image_folder(tmp_path / "img")
    (os.symlink if link == "symlink" else os.link)(os.path.join(root, "train", "a", "0.png"),
                                                   os.path.join(root, "val", "a", "leak.png"))
    with pytest.raises(data.DuplicateImageError, match="leak.png"):
        build(root, data.Split.TEST)
    build(root, data.Split.TRAIN)  # the training folder itself is fine


def test_a_symlink_loop_reaches_the_user_as_one_line(work, capsys):
    tmp_path, _ = work
    root = image_folder(tmp_path / "img")
    os.symlink(os.path.join(root, "train", "a"), os.path.join(root, "train", "a", "again"))
    config = write_config(str(tmp_path / "c2"), data={"dataset": "custom", "root": root, "validation_size": 1,
                                                      "num_workers": 0}, global_batch_size=2)
    code = model_def.main(["--config", config, "--batches", "1", "--checkpoint-dir", str(tmp_path / "ck")])
    one_error_line(capsys, code, "again")


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", 32768, 128), ("I;16", 65535, 255), ("I;16B", 257 * 40, 40), ("I", 50000, 195), ("I", 200, 200),
])
def test_16_and_32_bit_grayscale_is_scaled_not_clipped(mode, values, expected):
    image = Image.fromarray(np.full((4, 4), values, dtype=np.uint16 if mode != "I" else np.int32))
    if mode != image.mode:
        image = image.convert(mode) if mode != "I;16B" else Image.frombytes(
            "I;16B", (4, 4), np.full((4, 4), values, dtype=">u2").tobytes())
    rgb = np.asarray(augment.to_rgb(image))
    assert rgb.shape == (4, 4, 3) and (rgb == expected).all()


def test_other_modes_convert_and_float_is_refused():
    palette = Image.new("P", (4, 4))
    palette.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-image palette warning
        for image in (palette, Image.new("LA", (4, 4), (90, 0)), Image.new("CMYK", (4, 4)), Image.new("1", (4, 4)),
                      Image.new("PA", (4, 4)), Image.new("La", (4, 4))):
            assert augment.to_rgb(image).mode == "RGB"
    assert np.asarray(augment.to_rgb(Image.new("LA", (4, 4), (90, 0))))[0, 0].tolist() == [90, 90, 90]
    with pytest.raises(augment.UnsupportedImageError, match="mode F"):
        augment.to_rgb(Image.new("F", (4, 4)))


def test_a_16_bit_png_in_an_image_folder_is_mid_grey_not_white(tmp_path):
    root = image_folder(tmp_path / "img")
    path = os.path.join(root, "train", "a", "0.png")
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    dataset = build(root)
    index = [i for i, (p, _) in enumerate(dataset.samples) if p == path][0]
    assert np.asarray(dataset[index][0]).mean() == 128


def test_streamed_images_are_converted_the_same_and_truncation_still_fails():
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(buffer, format="PNG")
    assert np.asarray(gcs._decode(buffer.getvalue(), "gs://b/x.png")).mean() == 128
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    assert np.asarray(gcs._decode(buffer.getvalue(), "gs://b/x.jpg")).shape == (64, 64, 3)  # usable after close
    with pytest.raises(gcs.CorruptImageError, match="gs://b/x.jpg is not a readable image"):
        gcs._decode(buffer.getvalue()[: len(buffer.getvalue()) // 2], "gs://b/x.jpg")


def test_full_image_check_finds_a_truncated_body(tmp_path):
    root = image_folder(tmp_path / "img")
    path = os.path.join(root, "val", "b", "big.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    with open(path, "rb") as handle:
        body = handle.read()
    with open(path, "wb") as handle:
        handle.write(body[: len(body) // 2])
    test = build(root, data.Split.TEST)
    assert preflight.check_image_headers([test]) == 7  # the header alone passes
    with pytest.raises(preflight.UnreadableFileError, match="big.png"):
        preflight.check_image_headers([test], full=True)
    with pytest.raises(ConfigError, match="data.image_check"):
        parse_settings({}, {**DIGITS, "image_check": "pixels"})


# ----------------------------------------------------------------------------- 7. memory before the first step
def test_the_memory_estimate_follows_the_settings():
    small = preflight.estimate_step_memory("small_cnn", 32, 64, views=2, workers=2, trained_copies=4)
    assert small.activations == 2 * 64 * preflight.activation_bytes_per_image("small_cnn", 32)
    assert preflight.estimate_step_memory("small_cnn", 64, 64, 2, 2, 4).activations > 3.9 * small.activations
    assert preflight.estimate_step_memory("small_cnn", 32, 128, 2, 2, 4).total > 1.9 * small.total
    assert preflight.estimate_step_memory("small_cnn", 32, 64, 2, 4, 4).loader > small.loader
    huge = preflight.estimate_step_memory("small_cnn", 100_000, 32, 2, 0, 4)
    assert huge.total > 10 ** 14  # hundreds of TiB: shapes only, nothing allocated


def test_a_step_that_cannot_fit_is_refused_with_a_fake_small_memory(work, capsys, monkeypatch):
    tmp_path, config = work
    monkeypatch.setattr(preflight, "available_memory", lambda device: (None, 4 << 20))  # 4 MiB of host memory
    code = model_def.main(["--config", config, "--batches", "1", "--checkpoint-dir", str(tmp_path / "ck")])
    line = one_error_line(capsys, code, "hyperparameters.image_size (8)", "hyperparameters.global_batch_size (32",
                          "data.num_workers (0)", "4.0 MiB of host memory")
    assert "[train]" not in line
    monkeypatch.setattr(preflight, "available_memory", lambda device: (1 << 20, 64 << 30))  # a GPU with 1 MiB free
    with pytest.raises(preflight.MemoryLimitError, match="free on the GPU"):
        preflight.check_step_memory(preflight.estimate_step_memory("small_cnn", 32, 64, 2, 2, 4), None, "x")


def test_image_size_100000_is_refused_before_any_data_is_read(work, capsys):
    tmp_path, config = work
    code = model_def.main(["--config", config, "--batches", "1", "--checkpoint-dir", str(tmp_path / "ck"),
                           "--set", "image_size=100000"])
    one_error_line(capsys, code, "hyperparameters.image_size (100000)", "GiB")


# ----------------------------------------------------------------------------- 8. one line, not a traceback
@pytest.mark.parametrize("case, needle", [
    ("slots", "resources.slots_per_trial"), ("binary", "not a text (UTF-8) file"), ("set_data", "--set 'data=5'"),
    ("batches", "train_length.batches"), ("data0", "config key 'data'"), ("classifier0", "hyperparameters.classifier"),
])
def test_bad_values_end_in_one_line(work, capsys, case, needle):
    tmp_path, config = work
    argv = ["--config", config, "--batches", "1", "--checkpoint-dir", str(tmp_path / "ck")]
    text = open(config).read()
    if case == "slots":
        open(config, "w").write(text.replace("slots_per_trial: 1", "slots_per_trial: two"))
    elif case == "binary":
        open(config, "wb").write(bytes(range(256)) * 4)
    elif case == "set_data":
        argv += ["--set", "data=5"]
    elif case == "batches":
        argv[3] = str(10 ** 20)
    elif case == "data0":
        loaded = yaml.safe_load(text)
        loaded["data"] = 0
        open(config, "w").write(yaml.safe_dump(loaded))
    elif case == "classifier0":
        argv += ["--set", "classifier=0"]
    one_error_line(capsys, model_def.main(argv), needle)


def test_knn_k_above_the_bank_is_refused_before_training(work, capsys):
    tmp_path, config = work
    code = model_def.main(["--config", config, "--batches", "1", "--checkpoint-dir", str(tmp_path / "ck"),
                           "--set", "classifier.knn_k=5000"])
    one_error_line(capsys, code, "knn_k", "CLS_TRAIN")
    assert "[train]" not in capsys.readouterr().out


def test_a_label_list_naming_absent_images_is_one_config_error(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("nope.png\n")
    settings = parse_settings({"training_mode": "CLASSIFIER_ONLY", "pretrained_checkpoint": "ck",
                               "classifier": {"label_list": str(labels)}}, {**DIGITS, "dataset": "custom",
                                                                             "root": image_folder(tmp_path / "i"),
                                                                             "validation_size": 1})
    with pytest.raises(ConfigError, match="hyperparameters.classifier.label_list.*nope.png"):
        loaders.training_dataset(settings, 8, pretraining=False)


def test_a_pretrained_checkpoint_of_another_backbone_is_refused(tmp_path):
    (tmp_path / "load_data.json").write_text(json.dumps({"hparams": {"backbone": "small_cnn"}}))
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="backbone='small_cnn'.*resnet18_cifar"):
        checkpoints.check_pretrained_backbone(str(tmp_path), "ck", "resnet18_cifar")


def test_a_corrupt_object_met_in_a_worker_is_one_line_exit_2(capsys):
    wrapped = gcs.CorruptImageError("Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback "
                                    "(most recent call last):\n  ...\nruntime.gcs.CorruptImageError: gs://b/x.jpg is "
                                    "not a readable image (OSError: truncated)")

    def body(argv):
        raise wrapped
    assert utils.run_command(body, []) == 2
    assert capsys.readouterr().err.strip() == "error: gs://b/x.jpg is not a readable image (OSError: truncated)"


# ----------------------------------------------------------------------------- 9. messages that mislead
def test_config_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory: give the yaml file itself"):
        load_config(str(tmp_path))


def fake_checkpoint(directory, step=1):
    directory.mkdir(parents=True)
    torch.save({"models_state_dict": [{}]}, directory / checkpoints.STATE_FILE)
    checkpoints.write_complete_marker(str(directory), step)
    return directory


def test_the_folder_holding_checkpoints_names_the_newest_inside(tmp_path):
    fake_checkpoint(tmp_path / "ck" / "one", 1)
    newest = fake_checkpoint(tmp_path / "ck" / "two", 2)
    for what in ("--resume-from", "hyperparameters.pretrained_checkpoint", "--checkpoint"):
        with pytest.raises(checkpoints.IncompleteCheckpointError,
                           match=f"{what} .* is the folder holding 2 checkpoint.*{newest}"):
            checkpoints.verify_checkpoint(str(tmp_path / "ck"), what)


def test_backbone_weights_naming_a_directory(tmp_path):
    (tmp_path / "encoder.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a directory: give the weights file itself.*encoder.pt"):
        parse_settings({"backbone_weights": str(tmp_path)}, DIGITS)


def test_a_checkpoint_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "long").mkdir()
    with pytest.raises(InputError, match="--checkpoint-dir .* cannot be created: File name too long") as error:
        utils.check_output_dir(str(tmp_path / "long" / ("x" * 300)), "--checkpoint-dir")
    assert "[Errno" not in str(error.value)


@pytest.mark.parametrize("main, argv, flag", [
    (evaluate_result.main, ["--checkpoint", "ck", "--export-encoder", ""], "--export-encoder"),
    (evaluate_result.main, ["features", "--checkpoint", "ck", "--out", ""], "--out"),
    (model_def.main, ["--config", "c.yaml", "--metrics-out", ""], "--metrics-out"),
    (model_def.main, ["--config", "c.yaml", "--checkpoint-dir", " "], "--checkpoint-dir"),
])
def test_an_empty_path_is_refused_not_taken_for_no_flag(capsys, main, argv, flag):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and f"{flag} is empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv, env", [(["--experiment-id", "3"], "::not a url::"),
                                       (["--experiment-id", "3", "--master", "http://"], None)])
def test_a_master_address_that_is_not_a_url(capsys, monkeypatch, argv, env):
    if env:
        monkeypatch.setenv("DET_MASTER", env)
    one_error_line(capsys, evaluate_result.main(argv), "is not a URL")


def test_generate_blob_list_checks_its_arguments_before_listing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate_blob_list, "make_client", lambda *a, **k: pytest.fail("listed before checking"))
    out = str(tmp_path / "l.txt")
    for argv, needle in ((["--bucket", "b", "--output", out, "--extensions", ""], "--extensions"),
                         (["--bucket", "b", "--output", out, "--extensions", ",.,"], "--extensions"),
                         (["--bucket", "b", "--output", "gs://b"], "--output"),
                         (["--bucket", "", "--output", out], "--bucket")):
        with pytest.raises(SystemExit) as exit_:
            generate_blob_list.main(argv)
        assert exit_.value.code == 2 and needle in capsys.readouterr().err
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost 9023")
    assert generate_blob_list.main(["--bucket", "b", "--output", out]) == 2
    assert "STORAGE_EMULATOR_HOST='localhost 9023' is not a URL" in capsys.readouterr().err
