"""The commands' help as people expect it: ``--help`` of every command (and of ``evaluate_result.py``'s
``features`` and ``probe``) exits 0 at once, in plain text, naming the subcommands, without importing
torch or Determined (checked with ``python -X importtime``, not timed); every option has a help text;
usage errors also answer before the heavy imports."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import generate_blob_list
from runtime import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "determined", "numpy", "sklearn")

HELP_COMMANDS = [
    ["model_def.py", "--help"],
    ["evaluate_result.py", "--help"],
    ["evaluate_result.py", "features", "--help"],
    ["evaluate_result.py", "probe", "--help"],
    ["generate_blob_list.py", "--help"],
]


def run_with_import_log(argv: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs a command with ``-X importtime``; returns it and the top-level packages it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    return result, imported


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=" ".join)
def test_help_is_plain_text_and_imports_nothing_heavy(argv):
    result, imported = run_with_import_log(argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ")
    assert "`" not in result.stdout, "reStructuredText backticks in the help"
    assert "argparse" in imported  # the import log is read (the check below can fail)
    assert sorted(imported & set(HEAVY)) == []


def test_evaluate_help_names_the_subcommands():
    result, _ = run_with_import_log(["evaluate_result.py", "--help"])
    usage = result.stdout.split("\n\n")[0]
    assert "evaluate_result.py features" in usage and "evaluate_result.py probe" in usage
    assert "--checkpoint DIR" in usage and "--experiment-id N" in usage


@pytest.mark.parametrize("argv,message", [
    (["model_def.py"], "the following arguments are required: --config"),
    (["model_def.py", "--config", "x.yaml", "--epochs", "-1"], "--epochs must be >= 0"),
    (["evaluate_result.py"], "give one of --checkpoint DIR"),
    (["evaluate_result.py", "probe", "--features", "f.pt", "--k", "0"], "--k must be >= 1"),
], ids=["model_def-no-config", "model_def-epochs", "evaluate-no-source", "probe-k"])
def test_usage_errors_answer_before_the_heavy_imports(argv, message):
    result, imported = run_with_import_log(argv)
    assert result.returncode == 2 and message in result.stderr
    assert sorted(imported & set(HEAVY)) == []


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of every command, subcommands included."""
    found = {"model_def.py": cli.model_def_parser(), "evaluate_result.py": cli.evaluate_parser(),
             "generate_blob_list.py": generate_blob_list.build_parser()}
    for action in cli.probe_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"evaluate_result.py {name}": sub for name, sub in action.choices.items()})
    return found


def test_every_option_of_every_command_has_help():
    found = parsers()
    assert {"evaluate_result.py features", "evaluate_result.py probe"} <= set(found)
    missing = [f"{name} {action.option_strings[0]}" for name, parser in found.items() for action in parser._actions
               if action.option_strings and not action.help]
    assert missing == []


def test_the_entry_files_parse_with_the_light_parsers():
    """What runs is what the help describes: the entry files' parse functions are runtime/cli.py's."""
    import evaluate_result
    from runtime import launch

    args = launch.parse_args(["--config", "c.yaml", "--batches", "3", "--set", "seed=1"])
    assert (args.config, args.batches, args.set) == ("c.yaml", 3, ["seed=1"])
    args = evaluate_result.parse_args(["features", "--checkpoint", "d", "--out", "f.pt"])
    assert (args.command, args.checkpoint, args.out, args.batch_size) == ("features", "d", "f.pt", 256)
    args = cli.parse_evaluate_args(["--debug", "probe", "--features", "f.pt"])  # as the entry file sees it
    assert (args.command, args.features, args.debug) == ("probe", "f.pt", True)
    args = evaluate_result.parse_args(["--checkpoint", "d", "--fine-tune", "--head-lr", "0.1"])
    assert args.command is None and args.fine_tune and args.head_lr == 0.1
