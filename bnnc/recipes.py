"""Training recipes as data: one TOML file per published result, validated against a typed schema.

A recipe names a zoo model and a dataset and says how the published number was trained: optimizer,
learning-rate schedule, loss (label smoothing, distillation from a real-valued teacher), weight-decay
rule, epochs and batch size, and for two-step methods (ReActNet, Real-to-Binary) the stages, the second
initialised from the first's checkpoint. The shipped files live in ``bnnc/models/recipes/*.toml``;
``load_recipe(name_or_path)`` reads one, ``list_recipes()`` lists them.

Top-level keys give the defaults of every stage; ``[[stages]]`` entries override them per stage (the
tables ``optimizer``, ``schedule`` and ``loss`` are merged key by key). Without ``[[stages]]`` the recipe
has one stage named ``train``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Optional

from .errors import BnncError

__all__ = ["RecipeError", "TrainRecipe", "Stage", "OptimizerSpec", "ScheduleSpec", "LossSpec", "TeacherSpec",
           "Published", "load_recipe", "list_recipes", "recipe_from_dict", "recipes_dir", "lr_factor"]


class RecipeError(BnncError, ValueError):
    """A recipe file that does not follow the schema (unknown key, wrong type, bad value)."""


# ------------------------------------------------------------------------------------------------ schema


@dataclass(frozen=True)
class OptimizerSpec:
    """``sgd`` (momentum, nesterov), ``adam`` or ``adamw`` (betas, eps).

    ``weight_decay_rule``: ``all`` (every parameter), ``no_norm_bias`` (none on normalization-layer
    parameters, biases and other ≤1-D parameters; mmcls ``norm_decay_mult=0`` and timm's rule) or
    ``reactnet`` (only parameters with 4 dimensions or with "conv" in their name, the rest 0: ReActNet
    ``train.py``, methods.md §4.4)."""

    name: Literal["sgd", "adam", "adamw"]
    lr: float
    weight_decay: float = 0.0
    weight_decay_rule: Literal["all", "no_norm_bias", "reactnet"] = "all"
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class ScheduleSpec:
    """Learning rate at time t (an epoch index or an optimizer-step index, per ``interval``).

    Warm-up over the first W units (``warmup_epochs``, or ``warmup_steps`` with interval ``step``): the
    rate is multiplied by s + (1 − s)·t/W, s = ``warmup_start_factor``. Decay: ``cosine`` η_min + (lr −
    η_min)·(1 + cos(π t'/T'))/2 and ``linear`` η_min + (lr − η_min)·(1 − t'/T'), with t' = t − W over the
    T' = T − W units after the warm-up; ``step`` lr·γ^⌊t/step_size⌋ and ``multistep`` lr·γ^(number of
    milestones ≤ t), milestones and step size given in epochs; ``constant``."""

    name: Literal["cosine", "linear", "step", "multistep", "constant"] = "cosine"
    interval: Literal["epoch", "step"] = "epoch"
    eta_min: float = 0.0
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_start_factor: float = 0.0
    milestones: tuple[float, ...] = ()
    step_size: float = 0.0
    gamma: float = 0.1


@dataclass(frozen=True)
class TeacherSpec:
    """The real-valued teacher of a distillation loss: a registered bnnc model or ``torchvision:NAME``,
    with its weights (a bnnc checkpoint, or a torchvision state dict). Nothing is downloaded: a recipe
    whose teacher has no ``checkpoint`` needs one from the command line (``--teacher-checkpoint``)."""

    model: str
    checkpoint: Optional[str] = None
    model_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """``cross_entropy`` (optionally label-smoothed) or ``distributional`` (ReActNet's KD loss, methods.md
    §4.4): L = −(τ²/B) Σ_b Σ_c softmax(z_T/τ)_c · log softmax(z_S/τ)_c, mixed with the hard-label
    cross-entropy as (1 − w)·L + w·CE when ``hard_label_weight`` w > 0."""

    name: Literal["cross_entropy", "distributional"] = "cross_entropy"
    label_smoothing: float = 0.0
    temperature: float = 1.0
    hard_label_weight: float = 0.0
    teacher: Optional[TeacherSpec] = None


@dataclass(frozen=True)
class Published:
    """The number this recipe reproduces and where it was published."""

    top1: float
    source: str
    top5: Optional[float] = None
    notes: str = ""


@dataclass(frozen=True)
class Stage:
    """One training run. ``real_weights``: binary layers keep real-valued weights (their activations stay
    binary): step 1 of two-step training. ``init_from``: the name of an earlier stage whose final weights
    initialise this one (parameters whose name and shape match; the rest keep their initialization)."""

    name: str
    epochs: int
    batch_size: int
    optimizer: OptimizerSpec
    schedule: ScheduleSpec = ScheduleSpec()
    loss: LossSpec = LossSpec()
    real_weights: bool = False
    init_from: Optional[str] = None


@dataclass(frozen=True)
class TrainRecipe:
    """A whole training: model (``bnnc.models`` name and constructor kwargs), dataset (``bnnc.data``
    name; ``augment`` None = the dataset's training transform, ``input_size``, ``lighting`` as
    ``build_dataset``), seed, mixed precision (``amp``: bf16 autocast), DDP options and the stages."""

    name: str
    model: str
    dataset: str
    stages: tuple[Stage, ...]
    published: Optional[Published] = None
    model_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    augment: Optional[bool] = None
    input_size: Optional[int] = None
    lighting: bool = False
    amp: bool = False
    sync_batchnorm: bool = True
    workers: int = 0
    eval_batch_size: int = 256
    description: str = ""
    path: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys a stage may set, at the top level (defaults) or in [[stages]].
_STAGE_KEYS = {f.name for f in dataclasses.fields(Stage)} - {"name"}
_TOP_KEYS = ({f.name for f in dataclasses.fields(TrainRecipe)} - {"stages", "path"}) | _STAGE_KEYS | {"stages"}


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if t is float:
        return "a number"
    if t is int:
        return "an integer"
    if t is bool:
        return "true or false"
    if t is str:
        return "a string"
    if t is dict:
        return "a table"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin is tuple:
        return "an array"
    if dataclasses.is_dataclass(t):
        return "a table"
    return str(t)


def _convert(value, t, where: str):
    """Check ``value`` (parsed TOML) against the annotation ``t``; return it converted (tuples, dataclasses)."""
    origin = typing.get_origin(t)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return _convert(value, args[0], where)
    if origin is Literal:
        if value not in typing.get_args(t):
            raise RecipeError(f"{where} must be {_type_name(t)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be an array, got {type(value).__name__} {value!r}")
        args = typing.get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where} must have {len(args)} entries, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        return _build(t, value, where)
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{where} must be finite, got {value!r}")
        return float(value)
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if t is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if t is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {type(value).__name__} {value!r}")
        return value
    if t is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        return dict(value)
    raise TypeError(f"recipe schema: unsupported annotation {t!r}")  # a bug in this module, not in the file


def _build(cls, raw: dict, where: str):
    """``cls`` from the table ``raw`` at key path ``where`` (unknown keys and wrong types are errors)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecipeError(f"unknown key {(where + '.' if where else '') + unknown[0]!r} "
                          f"(known there: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name == "stages" and cls is TrainRecipe:
            kwargs[name] = ()  # built and checked by recipe_from_dict
        elif name in raw:
            kwargs[name] = _convert(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required key {(where + '.' if where else '') + name!r}")
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_stage(stage: Stage, where: str, earlier: list[str]) -> None:
    def bad(msg):
        raise RecipeError(f"{where}: {msg}")

    if stage.epochs < 1:
        bad(f"epochs must be ≥ 1, got {stage.epochs}")
    if stage.batch_size < 1:
        bad(f"batch_size must be ≥ 1, got {stage.batch_size}")
    o, s, l = stage.optimizer, stage.schedule, stage.loss
    if o.lr <= 0:
        bad(f"optimizer.lr must be positive, got {o.lr}")
    if o.weight_decay < 0:
        bad(f"optimizer.weight_decay must be ≥ 0, got {o.weight_decay}")
    if o.nesterov and o.name != "sgd":
        bad(f"optimizer.nesterov applies to sgd only, not {o.name}")
    if s.warmup_steps and s.warmup_epochs:
        bad("give schedule.warmup_epochs or schedule.warmup_steps, not both")
    if s.warmup_steps and s.interval != "step":
        bad("schedule.warmup_steps needs schedule.interval = 'step'")
    if s.warmup_steps < 0 or s.warmup_epochs < 0:
        bad("schedule warm-up length must be ≥ 0")
    if s.warmup_epochs >= stage.epochs:
        bad(f"schedule.warmup_epochs ({s.warmup_epochs}) must be shorter than the stage ({stage.epochs} epochs)")
    if not 0.0 <= s.warmup_start_factor <= 1.0:
        bad(f"schedule.warmup_start_factor must be in [0, 1], got {s.warmup_start_factor}")
    if s.name == "multistep" and (not s.milestones or list(s.milestones) != sorted(s.milestones)):
        bad("schedule 'multistep' needs increasing schedule.milestones (in epochs)")
    if s.name == "step" and s.step_size <= 0:
        bad("schedule 'step' needs schedule.step_size > 0 (in epochs)")
    if s.eta_min < 0 or s.eta_min > o.lr:
        bad(f"schedule.eta_min must be in [0, lr], got {s.eta_min}")
    if not 0.0 <= l.label_smoothing < 1.0:
        bad(f"loss.label_smoothing must be in [0, 1), got {l.label_smoothing}")
    if l.temperature <= 0:
        bad(f"loss.temperature must be positive, got {l.temperature}")
    if not 0.0 <= l.hard_label_weight <= 1.0:
        bad(f"loss.hard_label_weight must be in [0, 1], got {l.hard_label_weight}")
    if l.name == "distributional" and l.teacher is None:
        bad("loss 'distributional' needs a [loss.teacher] table (model, checkpoint)")
    if l.name == "cross_entropy" and l.teacher is not None:
        bad("loss.teacher is given but loss.name is 'cross_entropy' (set name = 'distributional')")
    if stage.init_from is not None and stage.init_from not in earlier:
        bad(f"init_from {stage.init_from!r} is not an earlier stage (earlier: {', '.join(earlier) or 'none'})")


def recipe_from_dict(raw: dict, name: str = "recipe", path: str | None = None) -> TrainRecipe:
    """Validate a parsed recipe (a TOML document as a dict) and build the :class:`TrainRecipe`."""
    try:
        return _recipe_from_dict(raw, name, path)
    except RecipeError as e:
        raise RecipeError(f"{path or name}: {e}") from None


def _recipe_from_dict(raw: dict, name: str, path: str | None) -> TrainRecipe:
    if not isinstance(raw, dict):
        raise RecipeError("a recipe is a table of keys")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    stage_defaults = {k: raw[k] for k in _STAGE_KEYS if k in raw}
    stages_raw = raw.get("stages", [{"name": "train"}])
    if not isinstance(stages_raw, list) or not stages_raw or not all(isinstance(s, dict) for s in stages_raw):
        raise RecipeError("'stages' must be a non-empty array of tables ([[stages]])")
    stages, names = [], []
    for i, s in enumerate(stages_raw):
        prefix = f"stages[{i}]" if "stages" in raw else ""
        if "name" not in s:
            raise RecipeError(f"{prefix}: missing required key 'name'")
        stage = _build(Stage, _merge(stage_defaults, s), prefix)
        if stage.name in names:
            raise RecipeError(f"{prefix}: stage name {stage.name!r} used twice")
        _check_stage(stage, f"stage {stage.name!r}", names)
        stages.append(stage)
        names.append(stage.name)
    top = {k: v for k, v in raw.items() if k not in _STAGE_KEYS and k != "stages"}
    top.setdefault("name", name)
    recipe = _build(TrainRecipe, {**top, "stages": ()}, "")
    recipe = dataclasses.replace(recipe, stages=tuple(stages), path=path)
    if recipe.workers < 0 or recipe.eval_batch_size < 1:
        raise RecipeError("workers must be ≥ 0 and eval_batch_size ≥ 1")
    return recipe


# ------------------------------------------------------------------------------------------------ files


def recipes_dir() -> Path:
    """The folder of the shipped recipes (package data ``bnnc.models/recipes``)."""
    return Path(str(resources.files("bnnc.models") / "recipes"))


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file names without ``.toml``), sorted."""
    d = recipes_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_recipe(name_or_path) -> TrainRecipe:
    """A shipped recipe by name (``bnnc.recipes.list_recipes()``) or a recipe file by path, validated."""
    s = str(name_or_path)
    path = Path(s)
    if not (s.endswith(".toml") or path.is_file() or "/" in s):
        path = recipes_dir() / f"{s}.toml"
        if not path.is_file():
            raise RecipeError(f"unknown recipe {s!r}; shipped recipes: {', '.join(list_recipes())} "
                              "(or pass the path of a .toml file)")
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not a valid TOML file ({e})") from None
    return recipe_from_dict(raw, name=path.stem, path=str(path))


# ------------------------------------------------------------------------------------------------ LR


def lr_factor(schedule: ScheduleSpec, base_lr: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The multiplier of ``base_lr`` for optimizer step ``step`` (0-based, over the whole stage)."""
    s = schedule
    epoch = step // steps_per_epoch
    if s.interval == "epoch":
        t, total, per_epoch = epoch, epochs, 1
    else:
        t, total, per_epoch = step, epochs * steps_per_epoch, steps_per_epoch
    warm = s.warmup_steps if s.warmup_steps else s.warmup_epochs * per_epoch
    factor = 1.0
    if t < warm:
        factor = s.warmup_start_factor + (1.0 - s.warmup_start_factor) * t / warm
    floor = s.eta_min / base_lr
    if s.name in ("cosine", "linear"):
        span = max(total - warm, 1)
        p = min(max(t - warm, 0) / span, 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if s.name == "cosine" else 1.0 - p
        factor *= floor + (1.0 - floor) * shape
    elif s.name == "step":
        factor *= s.gamma ** math.floor(t / (s.step_size * per_epoch))
    elif s.name == "multistep":
        factor *= s.gamma ** sum(1 for m in s.milestones if t >= m * per_epoch)
    return factor
