"""A survey of bad inputs (issue 17): every case is run as a user would, through the command's own
``main`` (in this process, so the whole survey takes minutes, not an hour of interpreter starts),
and its outcome classified:

* ``clear line``: exit 2 and one ``error:`` line naming the bad thing, before training started;
* ``clear after start``: the same line, but only after training steps ran;
* ``unclear``: an error exit whose message lacks the bad thing's name (or several lines, or exit 1);
* ``traceback``: an exception escaped the command;
* ``silently wrong``: exit 0 although the input is wrong (or said nothing where it should say);
* ``destroyed a file``: an input file of the command changed or disappeared.

    python tests/bad_inputs.py [--root /work/main] [--only NAME] [--list]

``--root`` runs the survey against another checkout (e.g. the commit before the fixes), whose
``tests/run_helpers.py`` writes the tiny configs. Prints one line per case and the counts. The
address space is limited (``RLIMIT_AS``) so that a case which would allocate without bound fails
fast instead of starving the machine; such a failure counts as a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import resource
import shutil
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence


class CaseTimeout(BaseException):
    """A case ran past its time limit (a bad value accepted and trained on, or a hang)."""


def _alarm(signum, frame):
    raise CaseTimeout()


OUTCOMES = ("clear line", "clear after start", "unclear", "traceback", "silently wrong", "destroyed a file")


@dataclass
class Case:
    name: str
    command: str                      # model_def | evaluate_result | generate_blob_list | check
    argv: Callable[["Workspace"], List[str]] = lambda w: []
    needles: Sequence[str] = ()       # what the error line must name
    env: Dict[str, str] = field(default_factory=dict)
    guarded: Callable[["Workspace"], List[str]] = lambda w: []  # input files that must survive
    expect: str = "refuse"            # refuse | note (exit 0 and the needles said on stdout)
    prepare: Optional[Callable[["Workspace"], None]] = None
    check: Optional[Callable[["Workspace"], str]] = None  # command 'check': returns an outcome


class Workspace:
    """The fixtures: a tiny digits config, a complete checkpoint, an image folder, weights, features."""

    def __init__(self, root: str):
        self.root = root
        self.dir = tempfile.mkdtemp(prefix="bad-inputs-")
        from run_helpers import write_config

        self.write_config = write_config
        self.config = write_config(os.path.join(self.dir, "cfg"))
        self.checkpoints = os.path.join(self.dir, "ckpts")
        self.out = os.path.join(self.dir, "out")
        os.makedirs(self.out)
        self.images = self.image_folder(os.path.join(self.dir, "img"))
        self.weights = os.path.join(self.dir, "weights.pt")
        import torch

        import backbone

        torch.save(backbone.build_backbone("small_cnn").state_dict(), self.weights)
        self._checkpoint = None
        self._features = None

    @staticmethod
    def image_folder(root: str, per_class: int = 6) -> str:
        import numpy as np
        from PIL import Image

        for split in ("train", "val"):
            for name in ("a", "b"):
                os.makedirs(os.path.join(root, split, name), exist_ok=True)
                for i in range(per_class):
                    pixels = np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
        return root

    def custom_config(self, name: str, **hparams) -> str:
        data = {"dataset": "custom", "root": self.images, "validation_size": 2, "num_workers": 0}
        return self.write_config(os.path.join(self.dir, name), data=data, **{"global_batch_size": 4, **hparams})

    def custom_copy(self, name: str) -> str:
        """A fresh copy of the image folder to damage."""
        target = os.path.join(self.dir, name)
        shutil.copytree(self.images, target)
        return target

    @property
    def checkpoint(self) -> str:
        if self._checkpoint is None:
            quietly("model_def", ["--config", self.config, "--batches", "1", "--checkpoint-dir", self.checkpoints])
            found = [os.path.join(self.checkpoints, n) for n in sorted(os.listdir(self.checkpoints))
                     if os.path.isfile(os.path.join(self.checkpoints, n, "byol_complete.json"))]
            self._checkpoint = found[-1]
        return self._checkpoint

    @property
    def features(self) -> str:
        if self._features is None:
            self._features = os.path.join(self.dir, "features.pt")
            quietly("evaluate_result", ["features", "--checkpoint", self.checkpoint, "--out", self._features])
        return self._features

    def yaml(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def config_text(self) -> str:
        with open(self.config) as handle:
            return handle.read()


def quietly(command: str, argv: List[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main_of(command)(argv)


def main_of(command: str) -> Callable:
    return __import__(command).main


def digest(path: str) -> Optional[str]:
    if os.path.isdir(path):
        return "|".join(f"{n}:{digest(os.path.join(path, n))}" for n in sorted(os.listdir(path)))
    if not os.path.exists(path):
        return None
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


case_limit_s = 120.0


def run_case(case: Case, work: Workspace) -> tuple[str, str]:
    """``(outcome, the line that decided it)``; a case still running after ``case_limit_s`` seconds
    is stopped and counted silently wrong (it accepted the value and worked on). The input files a
    case guards are restored after it."""
    if case.prepare:
        case.prepare(work)
    if case.command == "check":
        return case.check(work), ""
    argv = case.argv(work)
    guarded = case.guarded(work)
    before = {path: digest(path) for path in guarded}
    backup = tempfile.mkdtemp(prefix="guarded-")  # restored after the case: one case's damage stays its own
    for index, path in enumerate(guarded):
        (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, os.path.join(backup, str(index)))
    try:
        return _run(case, argv, guarded, before)
    finally:
        for index, path in enumerate(guarded):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
            copied = os.path.join(backup, str(index))
            (shutil.copytree if os.path.isdir(copied) else shutil.copy2)(copied, path)
        shutil.rmtree(backup, ignore_errors=True)


def _run(case: Case, argv: List[str], guarded: List[str], before: Dict[str, Optional[str]]) -> tuple[str, str]:
    limit_s = case_limit_s
    saved = {key: os.environ.get(key) for key in case.env}
    os.environ.update(case.env)
    out, err = io.StringIO(), io.StringIO()
    escaped = None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main_of(case.command)(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    except CaseTimeout:
        return "silently wrong", f"still running after {limit_s:g} s (accepted and worked on)"
    except BaseException as error:  # noqa: BLE001 (an escaped exception is what is counted)
        escaped, code = error, None
        err.write(traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    stdout, stderr = out.getvalue(), err.getvalue()
    if any(digest(path) != before[path] for path in guarded):
        return "destroyed a file", f"changed: {[p for p in guarded if digest(p) != before[p]]}"
    if escaped is not None or "Traceback (most recent call last)" in stderr:
        last = (stderr.strip().splitlines() or ["?"])[-1]
        return "traceback", last
    errors = [line for line in stderr.splitlines() if "error:" in line]
    started = "[train] step" in stdout or "[byol] finished" in stdout
    if case.expect == "note":
        said = all(needle in stdout + stderr for needle in case.needles)
        return ("clear line" if code == 0 and said else "silently wrong"), (errors or [""])[0]
    if code == 0:
        return "silently wrong", "exit 0"
    if len(errors) == 1 and code == 2 and all(needle.lower() in errors[0].lower() for needle in case.needles):
        return ("clear after start" if started else "clear line"), errors[0]
    return "unclear", f"exit {code}: " + (" | ".join(errors) or stderr.strip()[-200:])


# ----------------------------------------------------------------------------- the cases
def _loop(work: Workspace) -> str:
    root = work.custom_copy("img-loop")
    os.symlink(os.path.join(root, "train", "a"), os.path.join(root, "train", "a", "again"))
    return work.write_config(os.path.join(work.dir, "loop"), data={"dataset": "custom", "root": root,
                                                                   "validation_size": 2, "num_workers": 0},
                             global_batch_size=4)


def _dup_file(work: Workspace) -> str:
    root = work.custom_copy("img-dup")
    os.symlink(os.path.join(root, "train", "a", "0.png"), os.path.join(root, "train", "b", "copy.png"))
    return work.write_config(os.path.join(work.dir, "dup"), data={"dataset": "custom", "root": root,
                                                                  "validation_size": 2, "num_workers": 0},
                             global_batch_size=4)


def _val_is_train(work: Workspace) -> str:
    root = work.custom_copy("img-leak")
    os.symlink(os.path.join(root, "train", "a", "0.png"), os.path.join(root, "val", "a", "leak.png"))
    return work.write_config(os.path.join(work.dir, "leak"), data={"dataset": "custom", "root": root,
                                                                   "validation_size": 2, "num_workers": 0},
                             global_batch_size=4)


def _float_image(work: Workspace) -> str:
    import numpy as np
    from PIL import Image

    root = work.custom_copy("img-float")
    Image.fromarray(np.full((12, 12), 0.5, dtype=np.float32), mode="F").save(os.path.join(root, "val", "a", "f.tif"))
    return work.write_config(os.path.join(work.dir, "float"), data={"dataset": "custom", "root": root,
                                                                    "validation_size": 2, "num_workers": 0},
                             global_batch_size=4)


def _truncated(work: Workspace) -> str:
    import numpy as np
    from PIL import Image

    root = work.custom_copy("img-trunc")
    path = os.path.join(root, "val", "b", "big.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    return work.write_config(os.path.join(work.dir, "trunc"), data={"dataset": "custom", "root": root,
                                                                    "validation_size": 2, "num_workers": 0,
                                                                    "image_check": "full"}, global_batch_size=4)


def _sixteen_bit(work: Workspace) -> str:
    """A 16-bit grayscale PNG read through the dataset: mid-grey must stay mid-grey."""
    import numpy as np
    from PIL import Image

    import data

    root = work.custom_copy("img-16")
    Image.fromarray(np.full((12, 12), 32768, dtype=np.uint16)).save(os.path.join(root, "train", "a", "0.png"))
    dataset = data.build_dataset("custom", data.Split.TRAIN, root=root, transform=None, validation_size=2)
    index = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith(os.path.join("a", "0.png"))][0]
    mean = float(np.asarray(dataset[index][0]).mean())
    return "clear line" if 120 <= mean <= 136 else "silently wrong"


def _holder(work: Workspace) -> str:
    return os.path.dirname(work.checkpoint)


def _with(work: Workspace, name: str, edit: Callable[[str], str]) -> str:
    return work.yaml(name, edit(work.config_text()))


def _pretrained(work: Workspace, **hparams) -> List[str]:
    return ["--config", work.config, "--batches", "1", "--checkpoint-dir", work.out + "/c",
            "--set", "training_mode=CLASSIFIER_ONLY", "--set", f"pretrained_checkpoint={work.checkpoint}",
            *[item for key, value in hparams.items() for item in ("--set", f"{key}={value}")]]


def _link_to_config(work: Workspace) -> str:
    link = os.path.join(work.out, "link.json")
    if not os.path.lexists(link):
        os.symlink(work.config, link)
    return link


BASE = ["--batches", "1"]


def cases() -> List[Case]:
    m = "model_def"
    e = "evaluate_result"
    g = "generate_blob_list"

    def model(*extra, config=None):
        return lambda w: ["--config", config(w) if config else w.config, *BASE, "--checkpoint-dir", w.out + "/c",
                          *extra]

    return [
        # --- config files
        Case("config is a directory", m, lambda w: ["--config", w.dir], ["is a directory"]),
        Case("config is a binary file", m, lambda w: ["--config", _binary(w)], ["config file"]),
        Case("duplicate key seed", m, model(config=lambda w: _with(w, "dup1.yaml", lambda t: t.replace(
            "hyperparameters:\n", "hyperparameters:\n  seed: 3\n"))), ["seed", "twice"]),
        Case("duplicate hyperparameters section", m, model(config=lambda w: _with(
            w, "dup2.yaml", lambda t: t + "hyperparameters:\n  seed: 1\n")), ["hyperparameters", "twice"]),
        Case("duplicate key inside data", m, model(config=lambda w: _with(w, "dup3.yaml", lambda t: t.replace(
            "data:\n", "data:\n  num_workers: 1\n"))), ["num_workers", "twice"]),
        Case("slots_per_trial not a number", m, model(config=lambda w: _with(w, "slots.yaml", lambda t: t.replace(
            "slots_per_trial: 1", "slots_per_trial: two"))), ["slots_per_trial"]),
        Case("slots_per_trial zero", m, model(config=lambda w: _with(w, "slots0.yaml", lambda t: t.replace(
            "slots_per_trial: 1", "slots_per_trial: 0"))), ["slots_per_trial"]),
        Case("resources not a mapping", m, model(config=lambda w: _with(w, "res.yaml", lambda t: t.replace(
            "resources:\n  slots_per_trial: 1", "resources: 5"))), ["resources"]),
        Case("classifier: 0", m, model("--set", "classifier=0"), ["classifier"]),
        Case("augmentation: 0", m, model("--set", "augmentation=0"), ["augmentation"]),
        Case("data: 0 in the file", m, model(config=lambda w: _with(w, "data0.yaml", _data_zero)), ["data"]),
        Case("--set data=5", m, model("--set", "data=5"), ["data"]),
        Case("--set with an empty key part", m, model("--set", "classifier..knn_k=3"), ["classifier..knn_k"]),
        Case("--set value with a duplicate key", m, model("--set", "classifier={batch_size: 8, batch_size: 9}"),
             ["batch_size", "twice"]),
        Case("pretrained_checkpoint in pretraining", m, lambda w: model("--set", f"pretrained_checkpoint="
                                                                          f"{w.checkpoint}")(w),
             ["pretrained_checkpoint"]),
        Case("backbone_weights is a directory", m, model("--set", "backbone_weights=/tmp"), ["directory"]),
        Case("backbone_weights is a number", m, model("--set", "backbone_weights=5"), ["backbone_weights"]),
        Case("knn_k above the bank", m, model("--set", "classifier.knn_k=100000"), ["knn_k"]),
        Case("image_size 100000", m, model("--set", "image_size=100000"), ["image_size"]),
        Case("enormous --batches", m, lambda w: ["--config", w.config, "--batches", str(10 ** 20),
                                                 "--checkpoint-dir", w.out + "/c"], ["train_length"]),
        Case("enormous --epochs", m, lambda w: ["--config", w.config, "--epochs", str(10 ** 12),
                                                "--checkpoint-dir", w.out + "/c"], ["train_length"]),
        Case("pretrained checkpoint of another backbone", m, lambda w: _pretrained(w, backbone="resnet18_cifar"),
             ["backbone"]),
        Case("label list naming absent files", m, lambda w: _pretrained(
            w, **{"classifier.label_list": w.yaml("labels.txt", "nope_1.png\nnope_2.png\n")}), ["label_list"]),
        Case("pretrained_checkpoint is the folder holding it", m, lambda w: _pretrained(w)[:-1] + [
            f"pretrained_checkpoint={_holder(w)}"], ["newest complete"]),
        Case("--resume-from the folder holding it", m, lambda w: model("--resume-from", _holder(w))(w),
             ["newest complete"]),
        Case("--resume-from a file", m, lambda w: model("--resume-from", w.weights)(w), ["--resume-from"]),
        Case("--checkpoint-dir cannot be created", m, lambda w: ["--config", w.config, *BASE, "--checkpoint-dir",
                                                                 "/proc/self/nope"], ["--checkpoint-dir"]),
        Case("pretraining settings in a heads run are said", m, lambda w: _pretrained(w, tau_base=0.9),
             ["tau_base"], expect="note"),
        # --- outputs that are inputs
        Case("--metrics-out is the config", m, lambda w: model("--metrics-out", w.config)(w), ["config"],
             guarded=lambda w: [w.config]),
        Case("--metrics-out is the backbone weights", m, lambda w: model(
            "--metrics-out", w.weights, "--set", f"backbone_weights={w.weights}")(w), ["backbone_weights"],
             guarded=lambda w: [w.weights]),
        Case("--metrics-out through a symlink to the config", m, lambda w: model(
            "--metrics-out", _link_to_config(w))(w), ["config"], guarded=lambda w: [w.config]),
        Case("--metrics-out through .. to the config", m, lambda w: model(
            "--metrics-out", os.path.join(w.out, "..", "cfg", "tiny.yaml"))(w), ["config"],
             guarded=lambda w: [w.config]),
        Case("--metrics-out .png: the curves would overwrite it", m, lambda w: model(
            "--metrics-out", os.path.join(w.out, "m.png"))(w), ["curves"]),
        Case("--metrics-out inside the data root", m, lambda w: ["--config", w.custom_config("cm"), *BASE,
                                                                 "--checkpoint-dir", w.out + "/c", "--metrics-out",
                                                                 os.path.join(w.images, "m.json")], ["data.root"]),
        Case("--checkpoint-dir inside the data root", m, lambda w: ["--config", w.custom_config("cc"), *BASE,
                                                                    "--checkpoint-dir",
                                                                    os.path.join(w.images, "ck")], ["data.root"]),
        Case("--metrics-out inside the checkpoint resumed", m, lambda w: model(
            "--resume-from", w.checkpoint, "--metrics-out", os.path.join(w.checkpoint, "load_data.json"))(w),
             ["resume"], guarded=lambda w: [w.checkpoint]),
        Case("--export-encoder over the checkpoint's weights", e, lambda w: [
            "--checkpoint", w.checkpoint, "--export-encoder", os.path.join(w.checkpoint, "state_dict.pth")],
             ["checkpoint"], guarded=lambda w: [w.checkpoint]),
        Case("--export-encoder inside the checkpoint", e, lambda w: [
            "--checkpoint", w.checkpoint, "--export-encoder", os.path.join(w.checkpoint, "sub", "enc.pt")],
             ["checkpoint"], guarded=lambda w: [w.checkpoint]),
        Case("features --out over the checkpoint's trial state", e, lambda w: [
            "features", "--checkpoint", w.checkpoint, "--out", os.path.join(w.checkpoint, "trial_state.pkl")],
             ["checkpoint"], guarded=lambda w: [w.checkpoint]),
        Case("evaluation --metrics-out over the checkpoint's load_data.json", e, lambda w: [
            "--checkpoint", w.checkpoint, "--classifier-train-epochs", "1", "--checkpoint-dir", w.out + "/e",
            "--metrics-out", os.path.join(w.checkpoint, "load_data.json")], ["checkpoint"],
             guarded=lambda w: [w.checkpoint]),
        # --- flags that do nothing, bad flag values
        Case("--export-encoder with --fine-tune", e, lambda w: [
            "--checkpoint", w.checkpoint, "--export-encoder", os.path.join(w.out, "e1.pt"), "--fine-tune"],
             ["--fine-tune"]),
        Case("--export-encoder with --model-dir", e, lambda w: [
            "--checkpoint", w.checkpoint, "--export-encoder", os.path.join(w.out, "e2.pt"), "--model-dir", w.dir],
             ["--model-dir"]),
        Case("--checkpoint with --master", e, lambda w: [
            "--checkpoint", w.checkpoint, "--master", "http://127.0.0.1:1", "--classifier-train-epochs", "1",
            "--checkpoint-dir", w.out + "/e"], ["--master"]),
        Case("--export-encoder from the folder holding checkpoints", e, lambda w: [
            "--checkpoint", _holder(w), "--export-encoder", os.path.join(w.out, "e3.pt")], ["newest complete"]),
        Case("--checkpoint empty", e, lambda w: ["--checkpoint", "", "--export-encoder", os.path.join(w.out, "e.pt")],
             ["--checkpoint"]),
        Case("--export-encoder empty", e, lambda w: ["--checkpoint", w.checkpoint, "--export-encoder", "",
                                                     "--checkpoint-dir", w.out + "/e"], ["--export-encoder"]),
        Case("features --out empty", e, lambda w: ["features", "--checkpoint", w.checkpoint, "--out", ""], ["--out"]),
        Case("--metrics-out empty", m, model("--metrics-out", ""), ["--metrics-out"]),
        Case("--head-lr nan", e, lambda w: ["--checkpoint", w.checkpoint, "--fine-tune", "--head-lr", "nan",
                                            "--classifier-train-epochs", "1", "--checkpoint-dir", w.out + "/e"],
             ["--head-lr"]),
        Case("--classifier-train-epochs enormous", e, lambda w: [
            "--checkpoint", w.checkpoint, "--classifier-train-epochs", str(10 ** 12), "--checkpoint-dir",
            w.out + "/e"], ["epochs"]),
        Case("DET_MASTER not a URL", e, lambda w: ["--experiment-id", "3"], ["DET_MASTER", "not a URL"],
             env={"DET_MASTER": "::not a url::"}),
        Case("--master not a URL", e, lambda w: ["--experiment-id", "3", "--master", "http://"], ["--master"]),
        Case("probe --k above the bank", e, lambda w: ["probe", "--features", w.features, "--k", "100000"],
             ["--k"]),
        Case("generate_blob_list --bucket empty", g, lambda w: ["--bucket", "", "--output", w.out + "/l.txt"],
             ["--bucket"], env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}),
        Case("generate_blob_list --extensions empty", g, lambda w: [
            "--bucket", "b", "--extensions", "", "--output", w.out + "/l.txt"], ["--extensions"],
             env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}),
        Case("generate_blob_list --extensions ',,'", g, lambda w: [
            "--bucket", "b", "--extensions", ",,", "--output", w.out + "/l.txt"], ["--extensions"],
             env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}),
        Case("generate_blob_list --output gs://bucket only", g, lambda w: [
            "--bucket", "b", "--output", "gs://b", "--retry-deadline", "1"], ["--output"],
             env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}),
        Case("generate_blob_list --retry-deadline nan", g, lambda w: [
            "--bucket", "b", "--output", w.out + "/l.txt", "--retry-deadline", "nan"], ["--retry-deadline"],
             env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}),
        # --- environment variables
        Case("OMP_NUM_THREADS=0", m, model(), ["OMP_NUM_THREADS"], env={"OMP_NUM_THREADS": "0"}),
        Case("OMP_NUM_THREADS=abc", m, model(), ["OMP_NUM_THREADS"], env={"OMP_NUM_THREADS": "abc"}),
        Case("BYOL_DEBUG=no keeps the one line", m, lambda w: ["--config", w.dir], ["directory"],
             env={"BYOL_DEBUG": "no"}),
        Case("BYOL_DEBUG=maybe", m, model(), ["BYOL_DEBUG"], env={"BYOL_DEBUG": "maybe"}),
        Case("WORLD_SIZE=two", m, model(), ["WORLD_SIZE"], env={"WORLD_SIZE": "two"}),
        Case("RANK=x", m, model(), ["RANK"], env={"RANK": "x"}),
        Case("LOCAL_RANK=-1", m, model(), ["LOCAL_RANK"], env={"LOCAL_RANK": "-1"}),
        Case("BYOL_COLLECTIVE_TIMEOUT=abc", m, model(), ["BYOL_COLLECTIVE_TIMEOUT"],
             env={"BYOL_COLLECTIVE_TIMEOUT": "abc"}),
        Case("USE_TORCH_DISTRIBUTED=maybe", m, model(), ["USE_TORCH_DISTRIBUTED"],
             env={"USE_TORCH_DISTRIBUTED": "maybe"}),
        Case("STORAGE_EMULATOR_HOST not a URL", g, lambda w: ["--bucket", "b", "--output", w.out + "/l.txt",
                                                             "--retry-deadline", "1"], ["STORAGE_EMULATOR_HOST"],
             env={"STORAGE_EMULATOR_HOST": "localhost 9023"}),
        # --- data
        Case("symbolic link loop in a class folder", m, lambda w: ["--config", _loop(w), *BASE, "--checkpoint-dir",
                                                                   w.out + "/c"], ["again"]),
        Case("one file in two classes (symlink)", m, lambda w: ["--config", _dup_file(w), *BASE, "--checkpoint-dir",
                                                                w.out + "/c"], ["same file"]),
        Case("a test image that is a training image", m, lambda w: ["--config", _val_is_train(w), *BASE,
                                                                    "--checkpoint-dir", w.out + "/c"],
             ["training image"]),
        Case("a float (mode F) image", m, lambda w: ["--config", _float_image(w), *BASE, "--checkpoint-dir",
                                                     w.out + "/c"], ["f.tif"]),
        Case("a truncated image with image_check: full", m, lambda w: ["--config", _truncated(w), *BASE,
                                                                       "--checkpoint-dir", w.out + "/c"],
             ["big.png"]),
        Case("a 16-bit PNG", "check", check=_sixteen_bit),
    ]


def _data_zero(text: str) -> str:
    import yaml

    config = yaml.safe_load(text)
    config["data"] = 0
    return yaml.safe_dump(config)


def _binary(work: Workspace) -> str:
    path = os.path.join(work.dir, "binary.yaml")
    with open(path, "wb") as handle:
        handle.write(bytes(range(256)) * 4)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--only", action="append", default=[], help="run the cases whose name contains this")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--limit-s", type=float, default=120.0, help="time limit of one case")
    parser.add_argument("--memory-gib", type=float, default=12.0, help="address-space limit (RLIMIT_AS)")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    sys.path[:0] = [root, os.path.join(root, "tests")]
    chosen = [c for c in cases() if not args.only or any(o in c.name for o in args.only)]
    if args.list:
        print("\n".join(c.name for c in chosen))
        return 0
    global case_limit_s
    case_limit_s = args.limit_s
    limit = int(args.memory_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Workspace(root)
    os.makedirs(os.path.join(work.dir, "cwd"))
    os.chdir(os.path.join(work.dir, "cwd"))  # outputs beside it, not inside it (Determined copies the cwd)
    counts = {outcome: 0 for outcome in OUTCOMES}
    try:
        for case in chosen:
            try:
                outcome, line = run_case(case, work)
            except BaseException as error:  # noqa: BLE001 (a fixture failing is a traceback too)
                outcome, line = "traceback", f"{type(error).__name__}: {error}"
            counts[outcome] += 1
            print(f"{outcome:<18} {case.name}: {' '.join(line.split())[:220]}", flush=True)
    finally:
        shutil.rmtree(work.dir, ignore_errors=True)
    print(f"{len(chosen)} cases: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
