"""The command lines of ``model_def.py`` and ``evaluate_result.py``, read before anything heavy loads.

This module imports nothing but the standard library, so the entry files parse their arguments
first (``--help`` and usage errors answer in well under a second instead of after the 15-25 s that
torch and Determined take to import) and only then import the rest. Help texts are plain text, as a
terminal shows them.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

MODEL_DEF_DESCRIPTION = """\
BYOL (Grill et al. 2020, arXiv 2006.07733) through Determined's Trainer API: self-supervised
pretraining of an image encoder (hyperparameters.training_mode SELF_SUPERVISED), or linear heads
(CLASSIFIER_ONLY) or fine-tuning (FINE_TUNE) on a BYOL checkpoint.

Off a cluster it reads the hyperparameters and data sections of the config file and runs the
Trainer in local mode: one process, or several with
  USE_TORCH_DISTRIBUTED=1 torchrun --nproc_per_node N model_def.py --config ...
On a cluster (the experiment's entrypoint) the master hands the hyperparameters, the experiment
config and the latest checkpoint, and the local-only options (--set, --epochs, --batches,
--checkpoint-dir, --resume-from, --metrics-out) are refused: change a setting there with
  det experiment create --config hyperparameters.KEY=VALUE config/X.yaml ."""

MODEL_DEF_EPILOG = """\
examples:
  model_def.py --config config/local-digits.yaml
  model_def.py --config config/const-cifar10.yaml --epochs 1 --set data.root=/data/cifar10
  model_def.py --config config/local-digits.yaml --output-dir outputs/x --resume-from outputs/x/checkpoints/latest"""

EVALUATE_USAGE = """\
evaluate_result.py (--checkpoint DIR | --experiment-id N) [options]
       evaluate_result.py --checkpoint DIR --export-encoder OUT.pt|OUT.safetensors
       evaluate_result.py features --checkpoint DIR --out FEATURES.pt [options]
       evaluate_result.py probe --features FEATURES.pt [--k K]"""

EVALUATE_DESCRIPTION = """\
Evaluates a BYOL pretraining checkpoint (Grill et al. 2020, arXiv 2006.07733).

Linear protocol (appendix C.1, the default): one linear head per learning rate on the frozen
encoder; the head best on CLS_VALIDATION is reported on TEST, top-1 and top-5.
Fine-tuning (--fine-tune, appendix C.2): encoder and head trained together on a labelled subset
(--set classifier.label_fraction=0.01, or classifier.label_list=FILE), one run per rate of the
paper's grid 0.01, 0.02, 0.05, 0.1, 0.005 unless --head-lr / --encoder-lr fix one; the run best on
CLS_VALIDATION is reported on TEST.

--checkpoint DIR runs it here, from a checkpoint directory (a local run's, or one fetched with
det checkpoint download); --experiment-id N creates an evaluation experiment on a Determined cluster
(DET_MASTER or --master; det user login, or DET_USER/DET_PASS) and prints its id.

commands (each has its own --help):
  features   frozen features of CLS_TRAIN, CLS_VALIDATION and TEST written to a file
  probe      weighted cosine kNN and logistic regression on such a file, beside PCA of the pixels"""

EVALUATE_EPILOG = """\
examples:
  evaluate_result.py --checkpoint outputs/local-digits/checkpoints/latest
  evaluate_result.py --checkpoint outputs/local-digits/checkpoints/latest --resume    (after an interruption)
  evaluate_result.py --checkpoint DIR --fine-tune --set classifier.label_fraction=0.01
  evaluate_result.py --experiment-id 42 --best
  evaluate_result.py features --checkpoint DIR --out features.pt
  evaluate_result.py probe --features features.pt --k 20"""

PROBE_COMMANDS = ("features", "probe")
FINE_TUNE_LEARNING_RATES = (0.01, 0.02, 0.05, 0.1, 0.005)  # the paper's semi-supervised grid (appendix C.2)
DEBUG_HELP = "show the traceback of an error (or set BYOL_DEBUG=1)"
EXPORT_FORMATS = ("pt", "safetensors")  # evaluate_result.py --export-encoder


def model_def_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model_def.py", description=MODEL_DEF_DESCRIPTION, epilog=MODEL_DEF_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE", help="experiment config (config/*.yaml)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="N",
                        help="train N epochs (overrides hyperparameters.train_length)")
    length.add_argument("--batches", type=int, metavar="N",
                        help="train N batches (overrides hyperparameters.train_length)")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="the run's folder: checkpoints/ (UUID folders with the aliases latest and step-NNNNNN), "
                             "metrics.json, metrics.png, tensorboard/, evaluations/ (default: the folder above "
                             "--checkpoint-dir if given; with --resume-from, the resumed run's folder; else "
                             "outputs/<config file name>)")
    parser.add_argument("--checkpoint-dir", metavar="DIR",
                        help="where checkpoints go (default: the config's checkpoint_storage.host_path, else "
                             "OUTPUT_DIR/checkpoints)")
    parser.add_argument("--resume-from", metavar="DIR",
                        help="a checkpoint directory, or an alias such as OUTPUT_DIR/checkpoints/latest, to continue "
                             "from exactly (same settings, bit-identical weights)")
    parser.add_argument("--metrics-out", metavar="FILE",
                        help="the final metrics as JSON (default: OUTPUT_DIR/metrics.json; the training curves as "
                             "PNG beside it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a hyperparameter, or with data. the data section (a yaml value; repeatable), "
                             "e.g. --set backbone=resnet18_cifar --set data.root=/data/cifar10")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def refuse_empty_paths(parser: argparse.ArgumentParser, args: argparse.Namespace, flags: dict) -> None:
    """An empty path (``--export-encoder ''``) would silently mean 'not given' (an empty
    ``--export-encoder`` ran the whole evaluation instead) or the working directory: refused."""
    empty = [flag for name, flag in flags.items()
             if isinstance(getattr(args, name, None), str) and not getattr(args, name).strip()]
    if empty:
        parser.error(f"{', '.join(empty)} is empty: give a path or leave the flag out")


def parse_model_def_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = model_def_parser()
    args = parser.parse_args(argv)
    refuse_empty_paths(parser, args, {"config": "--config", "checkpoint_dir": "--checkpoint-dir",
                                      "resume_from": "--resume-from", "metrics_out": "--metrics-out"})
    for value, name in ((args.epochs, "--epochs"), (args.batches, "--batches")):
        if value is not None and value < 0:
            parser.error(f"{name} must be >= 0, got {value}")
    return args


def evaluate_parser() -> argparse.ArgumentParser:
    """The evaluation protocols (no command); ``features`` and ``probe`` are :func:`probe_parser`'s."""
    parser = argparse.ArgumentParser(prog="evaluate_result.py", usage=EVALUATE_USAGE, description=EVALUATE_DESCRIPTION,
                                     epilog=EVALUATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("what is evaluated (one of)")
    source.add_argument("--checkpoint", metavar="DIR", help="a local checkpoint directory (evaluated here)")
    source.add_argument("--experiment-id", type=int, metavar="N",
                        help="a Determined experiment: its final checkpoint is evaluated by a new experiment")
    which = source.add_mutually_exclusive_group()
    which.add_argument("--checkpoint-uuid", metavar="UUID",
                       help="with --experiment-id: evaluate this checkpoint of the experiment")
    which.add_argument("--best", action="store_true",
                       help="with --experiment-id: the best checkpoint by the searcher metric (default: the final one)")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--classifier-train-epochs", type=int, metavar="N",
                          help="training epochs (default: 80 for the linear protocol; fine-tuning 30 with "
                               "classifier.label_fraction <= 0.01, else 50)")
    protocol.add_argument("--fine-tune", action="store_true",
                          help="fine-tune the encoder with one head (FINE_TUNE) instead of the linear protocol")
    protocol.add_argument("--head-lr", type=float, metavar="LR",
                          help="fine-tuning: the head's base learning rate (default: one run per rate of the "
                               f"paper's grid {', '.join(f'{r:g}' for r in FINE_TUNE_LEARNING_RATES)}, chosen on "
                               "CLS_VALIDATION)")
    protocol.add_argument("--encoder-lr", type=float, metavar="LR",
                          help="fine-tuning: the encoder's base learning rate (default: classifier.encoder_lr, "
                               "else the head's)")
    protocol.add_argument("--validate-every", type=int, metavar="N",
                          help="validate every N epochs (default: every quarter of the run); always at the end")
    protocol.add_argument("--resume", action="store_true",
                          help="with --checkpoint: continue an interrupted evaluation (the same command plus "
                               "--resume) from the newest checkpoint in its folder")
    protocol.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="with --checkpoint: override a hyperparameter, or data.KEY, of the checkpoint's "
                               "configuration (repeatable)")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--export-encoder", metavar="OUT",
                         help="with --checkpoint: write the encoder's state_dict to OUT (OUT.pt, or "
                              "OUT.safetensors), its metadata to OUT.json and a model card to OUT.md, and stop "
                              "(no evaluation)")
    outputs.add_argument("--format", choices=EXPORT_FORMATS,
                         help="--export-encoder's format (default: safetensors for a .safetensors name, else pt)")
    outputs.add_argument("--output-dir", metavar="DIR",
                         help="with --checkpoint: the evaluation's folder: checkpoints/, metrics.json, metrics.png, "
                              "tensorboard/ (default: <run folder>/evaluations/linear-step-NNNNNN, beside the "
                              "evaluated run's checkpoints/)")
    outputs.add_argument("--checkpoint-dir", metavar="DIR",
                         help="with --checkpoint: where the evaluation's checkpoints go (default: "
                              "OUTPUT_DIR/checkpoints)")
    outputs.add_argument("--metrics-out", metavar="FILE",
                         help="with --checkpoint: the final metrics as JSON, the curves as PNG beside it "
                              "(default: OUTPUT_DIR/metrics.json)")
    cluster = parser.add_argument_group("cluster (with --experiment-id)")
    cluster.add_argument("--master", metavar="URL", help="the Determined master (default: DET_MASTER)")
    cluster.add_argument("--model-dir", metavar="DIR",
                         help="the model definition uploaded with the new experiment (default: this folder)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def probe_parser() -> argparse.ArgumentParser:
    """``evaluate_result.py features`` and ``evaluate_result.py probe`` (runtime/feature_probes.py)."""
    parser = argparse.ArgumentParser(prog="evaluate_result.py",
                                     description="Feature probes for fast iteration: frozen features once, then "
                                                 "read-outs that take seconds.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{features,probe}")
    features = commands.add_parser(
        "features", help="extract frozen features of the classifier splits to a file",
        description="Writes the frozen encoder features, labels and small (at most 32x32) pixel copies of "
                    "CLS_TRAIN, CLS_VALIDATION and TEST of a checkpoint to one file, for the probe command.")
    features.add_argument("--checkpoint", required=True, metavar="DIR", help="a local checkpoint directory")
    features.add_argument("--out", required=True, metavar="FEATURES.pt", help="the features file to write")
    features.add_argument("--batch-size", type=int, default=256, metavar="N",
                          help="images per forward pass (default %(default)s)")
    features.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a hyperparameter, or data.KEY, of the checkpoint's configuration "
                               "(e.g. --set data.root=/data/cifar10; repeatable)")
    features.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    probe = commands.add_parser(
        "probe", help="kNN and logistic regression on a features file, beside PCA of the pixels",
        description="Weighted cosine kNN (bank: CLS_TRAIN) and logistic regression (strength chosen on "
                    "CLS_VALIDATION) on the features of the features command, and the same two on PCA of the pixels; "
                    "TEST accuracy. A quick stand-in for the linear protocol, not the number to report.")
    probe.add_argument("--features", required=True, metavar="FEATURES.pt",
                       help="a file written by the features command")
    probe.add_argument("--k", type=int, default=20, help="neighbours of the kNN probe (default %(default)s)")
    probe.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def parse_evaluate_args(argv: Sequence[str]) -> argparse.Namespace:
    """``evaluate_result.py``'s arguments; ``command`` is ``features``, ``probe`` or None (a protocol)."""
    argv = list(argv)
    command = [arg for arg in argv if arg != "--debug"]  # --debug may stand anywhere, even before a command
    if command and command[0] in PROBE_COMMANDS:
        parser = probe_parser()
        args = parser.parse_args(command)
        args.debug = "--debug" in argv
        refuse_empty_paths(parser, args, {"checkpoint": "--checkpoint", "out": "--out", "features": "--features"})
        if args.command == "features" and args.batch_size < 1:
            parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.command == "probe" and args.k < 1:
            parser.error(f"--k must be >= 1, got {args.k}")
        return args
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    args.command = None
    if (args.checkpoint is None) == (args.experiment_id is None):
        parser.error("give one of --checkpoint DIR (evaluated here) or --experiment-id N (on a cluster)")
    if args.experiment_id is None and (args.checkpoint_uuid or args.best):
        parser.error("--checkpoint-uuid and --best choose a checkpoint of --experiment-id")
    if args.experiment_id is not None and (args.export_encoder or args.set or args.checkpoint_dir or args.metrics_out
                                           or args.output_dir or args.resume):
        parser.error("--export-encoder, --set, --output-dir, --checkpoint-dir, --metrics-out and --resume need "
                     "--checkpoint (fetch the checkpoint with `det checkpoint download`)")
    if args.format and not args.export_encoder:
        parser.error("--format applies to --export-encoder")
    refuse_empty_paths(parser, args, {"checkpoint": "--checkpoint", "export_encoder": "--export-encoder",
                                      "checkpoint_dir": "--checkpoint-dir", "metrics_out": "--metrics-out",
                                      "output_dir": "--output-dir", "model_dir": "--model-dir"})
    refuse_ignored_flags(parser, args)
    return args


MAX_EPOCHS = 100_000  # far beyond any protocol (the paper: 80 epochs linear, 30 or 50 fine-tuning)


def refuse_ignored_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags the chosen path would ignore are refused, never dropped without a word; learning rates
    and lengths are checked here, before anything loads."""
    if args.export_encoder:
        ignored = [flag for flag, value in (("--fine-tune", args.fine_tune), ("--head-lr", args.head_lr),
                                            ("--encoder-lr", args.encoder_lr), ("--set", args.set),
                                            ("--classifier-train-epochs", args.classifier_train_epochs),
                                            ("--checkpoint-dir", args.checkpoint_dir),
                                            ("--metrics-out", args.metrics_out), ("--model-dir", args.model_dir),
                                            ("--master", args.master), ("--output-dir", args.output_dir),
                                            ("--validate-every", args.validate_every), ("--resume", args.resume))
                   if value not in (None, False, [])]
        if ignored:
            parser.error(f"{', '.join(ignored)} would do nothing with --export-encoder, which only writes the "
                         f"encoder's weights: drop them, or run the evaluation without --export-encoder")
    elif args.checkpoint is not None and (args.model_dir or args.master):
        parser.error("--model-dir and --master are for --experiment-id (a new experiment on a cluster); a local "
                     "--checkpoint is evaluated here: drop them")
    if not args.fine_tune and (args.head_lr is not None or args.encoder_lr is not None):
        parser.error("--head-lr and --encoder-lr apply to --fine-tune; the linear protocol trains one head per "
                     "hyperparameters.classifier.learning_rates")
    for flag, value in (("--head-lr", args.head_lr), ("--encoder-lr", args.encoder_lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be a learning rate > 0, got {value}")
    if args.classifier_train_epochs is not None and not 1 <= args.classifier_train_epochs <= MAX_EPOCHS:
        parser.error(f"--classifier-train-epochs must be between 1 and {MAX_EPOCHS}, "
                     f"got {args.classifier_train_epochs}")


def announce_imports(command: str) -> None:
    """One line before the heavy imports, which take several seconds (tens on a cold cache), so a run
    never starts silent; rank 0 only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[{command}] loading torch and Determined...", file=sys.stderr, flush=True)
