"""Typed experiment settings: the ``hyperparameters`` and ``data`` sections of a config yaml,
checked before any work starts.

Every bad value gets a one-line :class:`utils.ConfigError` naming the key, the value and what is
allowed. Defaults follow the paper (section 3.3, appendix C) where it gives one.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

import augment
import backbone
from data import DataSettings, parse_data_section
from runtime.classifier import ClassifierSettings, parse_classifier_section
from utils import ConfigError, check_keys, checked_number, reject

# Top-level sections of a Determined experiment config (0.38, expconf/v0/experiment.json); anything
# else is a misspelling (``datasets:`` for ``data:``) and is refused like an unknown key.
EXPERIMENT_SECTIONS = (
    "bind_mounts", "checkpoint_policy", "checkpoint_storage", "data", "data_layer", "debug", "description",
    "entrypoint", "environment", "hyperparameters", "integrations", "internal", "labels", "log_policies",
    "max_restarts", "min_checkpoint_period", "min_validation_period", "name", "optimizations", "pbs",
    "perform_initial_validation", "preemption_timeout", "profiling", "project", "records_per_epoch",
    "reproducibility", "resources", "retention_policy", "scheduling_unit", "searcher", "security", "slurm",
    "tensorboard_storage", "workspace")


class TrainingMode(str, enum.Enum):
    SELF_SUPERVISED = "SELF_SUPERVISED"  # BYOL pretraining (section 3)
    CLASSIFIER_ONLY = "CLASSIFIER_ONLY"  # linear heads on a frozen encoder (appendix C.1)
    FINE_TUNE = "FINE_TUNE"              # encoder trained together with the heads (appendix C.2)


@dataclass(frozen=True)
class Length:
    """A training length or period, in ``batches`` (global steps) or ``epochs``."""

    batches: Optional[int] = None
    epochs: Optional[int] = None

    def to_batches(self, steps_per_epoch: int) -> int:
        return self.batches if self.batches is not None else self.epochs * steps_per_epoch

    def __str__(self) -> str:
        return f"{self.batches} batches" if self.batches is not None else f"{self.epochs} epochs"


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Settings:
    training_mode: TrainingMode = TrainingMode.SELF_SUPERVISED
    seed: int = 0
    backbone: str = "small_cnn"
    backbone_weights: Optional[str] = None
    init: str = "reference"                      # reference (the authors') | torchvision (backbone.py)
    image_size: int = 32
    global_batch_size: int = 256
    train_length: Length = Length(epochs=10)
    warmup_epochs: float = 10.0
    base_lr: float = 0.2
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    lars_eta: float = 1e-3
    tau_base: float = 0.996
    projection_size: int = 256
    projection_hidden_size: int = 4096
    sync_batch_norm: bool = False
    precision: str = "fp32"                      # fp32 | bf16 (autocast of the forward passes)
    channels_last: Optional[bool] = None         # null: on for CUDA and CPU (performance.use_channels_last)
    compile: bool = False                        # torch.compile the forward passes
    finite_check_period: int = 50                # steps between non-finite loss checks (host reads)
    validation_period: Optional[Length] = None
    checkpoint_period: Optional[Length] = None
    classifier_validation: bool = True
    compare_random_init: bool = False            # after training, the same probe on a random encoder
    pretrained_checkpoint: Optional[str] = None   # CLASSIFIER_ONLY / FINE_TUNE: the BYOL checkpoint
    augmentation: dict = field(default_factory=dict)   # {'view1': {...}, 'view2': {...}} overrides
    classifier: ClassifierSettings = ClassifierSettings()
    data: DataSettings = DataSettings()
    # The two views' augmentations (table 6 with the overrides above), parsed once by augment.py.
    views: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", augment.view_augmentations(self.augmentation))

    def as_hparams(self) -> dict:
        """Plain JSON-able dict of the hyperparameters (for logs and checkpoints)."""
        values = dataclasses.asdict(self)
        values.pop("views")
        return _plain(values)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def parse_length(value: Any, key: str, optional: bool = True) -> Optional[Length]:
    if value is None and optional:
        return None
    if isinstance(value, dict) and set(value) == {"batches", "epochs"}:
        reject(key, value, "give one unit, {batches: N} or {epochs: N}, not both (--set " + key.split(".", 1)[-1]
              + ".batches=N replaces the whole length)")
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("batches", "epochs"):
        reject(key, value, "expected {batches: N} or {epochs: N}")
    unit, amount = next(iter(value.items()))
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < (0 if key.endswith("train_length") else 1):
        reject(f"{key}.{unit}", amount, "must be a whole number >= " + ("0" if key.endswith("train_length") else "1"))
    if amount > MAX_STEPS:
        reject(f"{key}.{unit}", amount, f"must be <= {MAX_STEPS:,} (the paper's longest run is about 312,500 steps: "
                                        f"1000 epochs of ImageNet at batch 4096)")
    return Length(**{unit: amount})


MAX_STEPS = 10 ** 9  # a bound on any length or period, far beyond any run, well inside 64-bit step counters


def parse_settings(hyperparameters: dict, data_section: Optional[dict] = None, slots: int = 1) -> Settings:
    """Checks the ``hyperparameters`` (and ``data``) sections into :class:`Settings`."""
    prefix = "hyperparameters."
    hyperparameters = dict(hyperparameters or {})
    hyperparameters.pop("global_batch_size_per_slot", None)
    check_keys(hyperparameters, Settings, prefix)
    if "data" in hyperparameters and data_section:
        reject(prefix + "data", hyperparameters["data"], "give the data section once (top level or in hyperparameters)")
    given_data = hyperparameters.pop("data", None)
    data_section = given_data if given_data is not None else (data_section if data_section is not None else {})
    values = {f.name: getattr(Settings(), f.name) for f in dataclasses.fields(Settings) if f.init}
    # Batch norm over the global batch (section 3.3) by default: synchronised when there are several
    # processes, unless the config says sync_batch_norm: false. The one place of this default.
    values["sync_batch_norm"] = slots > 1
    values.update(hyperparameters)
    try:
        values["training_mode"] = TrainingMode(values["training_mode"])
    except ValueError:
        reject(prefix + "training_mode", values["training_mode"],
              f"allowed: {', '.join(m.value for m in TrainingMode)}")
    try:
        backbone.check_backbone_name(values["backbone"])
    except ValueError as error:
        raise ConfigError(f"config key 'hyperparameters.backbone': {error}") from None
    for key in ("seed",):
        values[key] = checked_number(values, key, prefix, int, minimum=0)
    values["image_size"] = checked_number(values, "image_size", prefix, int, minimum=8)
    values["global_batch_size"] = checked_number(values, "global_batch_size", prefix, int, minimum=2)
    if values["global_batch_size"] % slots:
        reject(prefix + "global_batch_size", values["global_batch_size"],
              f"must be divisible by the number of slots ({slots})")
    if values["global_batch_size"] // slots < 2:
        reject(prefix + "global_batch_size", values["global_batch_size"],
              "batch norm needs at least 2 images per slot")
    if isinstance(values["train_length"], Length):
        pass
    else:
        values["train_length"] = parse_length(values["train_length"], prefix + "train_length", optional=False)
    for key in ("validation_period", "checkpoint_period"):
        if not isinstance(values[key], Length):
            values[key] = parse_length(values[key], prefix + key)
    values["warmup_epochs"] = checked_number(values, "warmup_epochs", prefix, minimum=0)
    values["base_lr"] = checked_number(values, "base_lr", prefix, minimum=0, exclusive_min=True)
    values["weight_decay"] = checked_number(values, "weight_decay", prefix, minimum=0)
    values["momentum"] = checked_number(values, "momentum", prefix, minimum=0, maximum=1)
    values["lars_eta"] = checked_number(values, "lars_eta", prefix, minimum=0, exclusive_min=True)
    values["tau_base"] = checked_number(values, "tau_base", prefix, minimum=0, maximum=1)
    values["projection_size"] = checked_number(values, "projection_size", prefix, int, minimum=1)
    values["projection_hidden_size"] = checked_number(values, "projection_hidden_size", prefix, int, minimum=1)
    if values["init"] not in backbone.INITIALISATIONS:
        reject(prefix + "init", values["init"], f"allowed: {', '.join(backbone.INITIALISATIONS)} (the authors' "
               "initialisation, or torchvision's and torch's own)")
    if values["precision"] not in PRECISIONS:
        reject(prefix + "precision", values["precision"], f"allowed: {', '.join(PRECISIONS)}")
    if values["channels_last"] is not None and not isinstance(values["channels_last"], bool):
        reject(prefix + "channels_last", values["channels_last"], "expected true, false or null (on for CUDA and CPU)")
    values["finite_check_period"] = checked_number(values, "finite_check_period", prefix, int, minimum=1)
    for key in ("sync_batch_norm", "classifier_validation", "compare_random_init", "compile"):
        if not isinstance(values[key], bool):
            reject(prefix + key, values[key], "expected true or false")
    if values["augmentation"] is None:  # a section left empty in the yaml
        values["augmentation"] = {}
    if not isinstance(values["augmentation"], dict):
        reject(prefix + "augmentation", values["augmentation"], "expected a mapping with keys view1 and/or view2")
    if not isinstance(values["classifier"], ClassifierSettings):
        values["classifier"] = parse_classifier_section({} if values["classifier"] is None else values["classifier"])
    values["data"] = parse_data_section(data_section)
    if values["training_mode"] != TrainingMode.SELF_SUPERVISED and not values["pretrained_checkpoint"]:
        reject(prefix + "pretrained_checkpoint", values["pretrained_checkpoint"],
              f"{values['training_mode'].value} needs the BYOL checkpoint to load (a directory or storage id)")
    if values["training_mode"] == TrainingMode.FINE_TUNE:
        # One encoder is shared by all heads: with several head learning rates the encoder would be
        # trained by the sum of their losses, and no head would be the run its learning rate names.
        rates = values["classifier"].learning_rates
        if len(rates) != 1:
            reject(prefix + "classifier.learning_rates", list(rates),
                  "FINE_TUNE trains the encoder with the head, so it takes exactly one learning rate "
                  "(sweep learning rates with separate trials)")
        if values["classifier"].encoder_lr <= 0:
            reject(prefix + "classifier.encoder_lr", values["classifier"].encoder_lr,
                  "FINE_TUNE needs an encoder learning rate > 0 (for a frozen encoder use CLASSIFIER_ONLY)")
    for key in ("backbone_weights", "pretrained_checkpoint"):
        if values[key] is not None and (not isinstance(values[key], str) or not values[key].strip()):
            reject(prefix + key, values[key], "expected a path" + (" (or a storage id)" if key != "backbone_weights"
                                                                   else ""))
    check_backbone_weights(values["backbone_weights"])
    check_mode_keys(hyperparameters, values)
    try:
        return Settings(**values)
    except augment.ViewSettingsError as error:  # the views are parsed by augment.view_augmentations
        if error.view is None:
            reject(prefix + "augmentation", values["augmentation"], str(error))
        raise ConfigError(f"config key '{prefix}augmentation.{error.view}': {error}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (at any depth): PyYAML keeps the
    last silently, so a second ``seed:`` would win and a second ``hyperparameters:`` section would
    replace the first whole."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' then 'key: ...' overrides the merged value: allowed
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # an unhashable key: the base class says so
                if key in seen:
                    first = seen[key]
                    raise ConfigError(f"{self.name}: key {key!r} is given twice in one mapping (lines {first} and "
                                      f"{key_node.start_mark.line + 1}); yaml would silently keep the last: "
                                      f"remove one")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text, where: str) -> Any:
    """``text`` (a string or a stream) as yaml with :class:`UniqueKeyLoader`; ``where`` names it in errors."""
    loader = UniqueKeyLoader(text)
    loader.name = where
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_backbone_weights(path: Optional[str]) -> None:
    """``backbone_weights`` names an existing file (a folder gets a hint naming the weights inside)."""
    if path is None:
        return
    key = "hyperparameters.backbone_weights"
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith((".pt", ".pth", ".bin")))
        reject(key, path, "is a directory: give the weights file itself (a state_dict saved with torch.save)"
               + (f", e.g. {os.path.join(path, inside[0])!r}" if inside else ""))
    if not os.path.isfile(path):
        reject(key, path, "file does not exist")


# Keys that act only in some training modes (paper: pretraining, section 3; linear heads and
# fine-tuning, appendix C). A key given with a non-default value where it does nothing is refused, or
# said (pretraining settings inherited by an evaluation run's config): never silently ignored.
PRETRAINING_ONLY_KEYS = ("base_lr", "warmup_epochs", "weight_decay", "momentum", "lars_eta", "tau_base",
                         "projection_size", "projection_hidden_size")
HEAD_TRAINING_KEYS = ("learning_rates", "train_epochs", "momentum", "weight_decay", "logit_clip",
                      "logit_regularization")


def _differs(section: dict, key: str, default: Any) -> bool:
    return key in section and section[key] is not None and section[key] != default


def check_mode_keys(given: dict, values: dict) -> None:
    """Refuses settings the chosen ``training_mode`` would ignore (see :func:`mode_notes` for those
    only said)."""
    prefix = "hyperparameters."
    mode = values["training_mode"]
    if mode == TrainingMode.SELF_SUPERVISED:
        if values["pretrained_checkpoint"] is not None:
            reject(prefix + "pretrained_checkpoint", values["pretrained_checkpoint"],
                   "read only by CLASSIFIER_ONLY and FINE_TUNE (the encoder their heads train on); SELF_SUPERVISED "
                   "pretraining starts from random weights or from backbone_weights (a state_dict file): remove it "
                   "or set training_mode")
        return
    if values["backbone_weights"] is not None:
        reject(prefix + "backbone_weights", values["backbone_weights"],
               f"does nothing in {mode.value}: the encoder comes from pretrained_checkpoint; remove it")


def mode_notes(given: dict, settings: "Settings") -> list:
    """Lines saying which given settings this run does not use: classifier settings that only the
    evaluation runs of this pretraining's checkpoints read (``evaluate_result.py`` inherits the
    config), and pretraining settings in a heads run. :func:`check_mode_keys` refuses the rest."""
    if not isinstance(given, dict):
        return []
    classifier = given.get("classifier") if isinstance(given.get("classifier"), dict) else {}
    default_classifier = ClassifierSettings()
    if settings.training_mode != TrainingMode.SELF_SUPERVISED:
        default = Settings()
        unused = [key for key in PRETRAINING_ONLY_KEYS + ("compare_random_init",)
                  if _differs(given, key, getattr(default, key))]
        unused += [f"classifier.{key}" for key in ("knn_k",) + (("encoder_lr",) if settings.training_mode
                                                                 == TrainingMode.CLASSIFIER_ONLY else ())
                   if _differs(classifier, key, getattr(default_classifier, key))]
        return [f"note: these settings act in SELF_SUPERVISED pretraining (encoder_lr: in FINE_TUNE) and do "
                f"nothing in this {settings.training_mode.value} run: {', '.join(unused)}"] if unused else []
    later = ("label_fraction", "label_list", "encoder_lr", "augmentation")
    later += HEAD_TRAINING_KEYS if not settings.classifier_validation else ()
    unused = [f"classifier.{key}" for key in later if _differs(classifier, key, getattr(default_classifier, key))]
    return [f"note: {', '.join(unused)} do nothing in this pretraining run"
            + ("" if settings.classifier_validation else " (classifier_validation: false)")
            + "; they are kept for evaluate_result.py, whose runs inherit this config"] if unused else []


def load_config(path: str) -> dict:
    """Reads an experiment yaml; a missing file, a folder, a file that is not text or bad yaml gets
    a clear error."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory: give the yaml file itself, e.g. "
                          f"{os.path.join(path, 'local-digits.yaml')}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist" if not os.path.lexists(path)
                          else f"config file {path!r} is not a regular file (a broken link or a device)")
    try:
        with open(path, encoding="utf-8") as handle:
            config = parse_yaml(handle, f"config file {path!r}")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path!r} is not a text (UTF-8) file ({error.reason} at byte {error.start}): "
                          f"give an experiment yaml such as config/local-digits.yaml") from None
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())  # yaml's message spans lines; errors are one line
        raise ConfigError(f"config file {path!r} is not valid yaml: {detail}") from None
    if not isinstance(config, dict) or not isinstance(config.get("hyperparameters"), dict):
        raise ConfigError(f"config file {path!r} has no 'hyperparameters' mapping")
    check_sections(config, path)
    if config.get("data") is not None and not isinstance(config["data"], dict):
        reject("data", config["data"], "expected a mapping, e.g. {dataset: digits} (a data: 0 would silently "
               "train on the default dataset)")
    return config


def check_sections(config: dict, where: str) -> None:
    """Refuses top-level sections that a Determined experiment config does not have."""
    for key in config:
        if key not in EXPERIMENT_SECTIONS:
            near = difflib.get_close_matches(str(key), EXPERIMENT_SECTIONS, n=1, cutoff=0.6)
            raise ConfigError(f"config file {where!r} has unknown top-level section {key!r}"
                              + (f" (did you mean {near[0]!r}?)" if near else "")
                              + f"; known sections: {', '.join(EXPERIMENT_SECTIONS)}")


def slots_of(config: dict) -> int:
    """``resources.slots_per_trial`` (default 1), a whole number >= 1."""
    resources = config.get("resources")
    if resources is None:
        return 1
    if not isinstance(resources, dict):
        reject("resources", resources, "expected a mapping, e.g. {slots_per_trial: 1}")
    if resources.get("slots_per_trial") is None:
        return 1
    return checked_number(resources, "slots_per_trial", "resources.", int, minimum=1)


def load_settings(path: str, slots: Optional[int] = None) -> Settings:
    config = load_config(path)
    return parse_settings(config["hyperparameters"], config.get("data"), slots or slots_of(config))


def apply_overrides(hparams: dict, data_section: dict, items) -> None:
    """``--set a.b=value`` (a yaml value) into the hyperparameters, ``--set data.x=value`` into the
    data section, in place."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. backbone=resnet18_cifar or data.root=/data")
        target, parts = hparams, key.split(".")
        if parts[0] == "data":
            target, parts = data_section, parts[1:]
            if not parts:
                raise ConfigError(f"--set {item!r}: the data section is set one key at a time, e.g. "
                                  f"--set data.root=/data or --set data.dataset=cifar10")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: {key!r} has an empty part; expected KEY or SECTION.KEY, e.g. "
                              f"classifier.knn_k=20")
        for depth, part in enumerate(parts[:-1]):
            if target is hparams and depth == 0 and part in LENGTH_KEYS:
                target[part] = {}  # a length has one unit: --set checkpoint_period.batches=10 replaces it
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
        try:
            target[parts[-1]] = parse_yaml(value, f"--set {item!r}")
        except yaml.YAMLError as error:
            detail = " ".join(str(error).split())
            raise ConfigError(f"--set {item!r}: the value {value!r} is not valid yaml ({detail}); quote strings "
                              f"and close brackets, e.g. --set 'classifier.learning_rates=[0.1, 0.05]'") from None


LENGTH_KEYS = ("train_length", "validation_period", "checkpoint_period")
SEARCH_TYPES = ("const", "int", "double", "log", "categorical")  # Determined's hyperparameter types


def local_values(hparams: dict, prefix: str = "") -> dict:
    """The hyperparameters of a local run: a search space of a cluster config (a mapping with a
    Determined ``type``, sampled there by the master's searcher) must be given one value with
    ``--set``, which the error suggests (the middle of the range, or the first category); a ``const``
    is its ``val``. Nested mappings are walked; everything else is kept."""
    values = {}
    for key, value in hparams.items():
        if isinstance(value, dict) and value.get("type") in SEARCH_TYPES:
            if value["type"] == "const":
                value = value.get("val")
            else:
                raise ConfigError(f"config key 'hyperparameters.{prefix}{key}' is a search space (type "
                                  f"{value['type']}) that Determined's searcher samples on a cluster; a local run "
                                  f"takes one value: --set {prefix}{key}={_example(value)}")
        elif isinstance(value, dict):
            value = local_values(value, f"{prefix}{key}.")
        values[key] = value
    return values


def _example(space: dict) -> Any:
    """A value inside a search space, for the error of :func:`local_values`."""
    kind = space["type"]
    try:
        if kind == "categorical":
            return space["vals"][0]
        middle = (space["minval"] + space["maxval"]) / 2
        if kind == "log":
            return f"{space['base'] ** middle:.3g}"
        return int(middle) if kind == "int" else f"{middle:.3g}"
    except (KeyError, IndexError, TypeError):
        return "VALUE"
