"""Turn what the user typed (alias, timm name or model card) into a float timm model.

Resolution is split from building so a run can record exactly which model it used
(``ModelSpec`` is JSON-round-trippable) and rebuild it later without re-guessing.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch import nn

from lrpq.errors import LrpqError
from lrpq.prune.structure import PrunedStructure, apply_structure

ALIASES: dict[str, str] = {
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
}

CARD_REQUIRED_DATA_KEYS = ("input_size", "mean", "std")
PRUNED_CARD = "model.json"  # the card in a pruned run directory (``lrpq prune``), found when given the folder
MAX_LISTED_KEYS = 3
SUGGEST_CUTOFF = 0.6


class ModelError(LrpqError):
    """A model name, model card or checkpoint that lrpq cannot turn into a model."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same float model and feed it correctly."""

    source: str
    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None
    pretrained: bool = False
    pruning: dict[str, Any] | None = None  # lrpq.prune.structure.PrunedStructure as JSON, applied before loading

    def __post_init__(self) -> None:
        # Normalise here so a spec read back from JSON compares equal to the one that was saved.
        object.__setattr__(self, "data_config", _normalize_data_config(self.data_config, self.source))

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}
        return data

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        try:
            return cls(**data)
        except TypeError as err:
            raise ModelError(f"model spec {data!r} is malformed ({err}); expected ModelSpec fields") from None


def _normalize_data_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Tuples for sizes/statistics and positive finite std, so preprocessing can never emit NaN/Inf."""
    try:
        out = dict(config)
        out["input_size"] = tuple(int(v) for v in config["input_size"])
        out["mean"] = tuple(float(v) for v in config["mean"])
        out["std"] = tuple(float(v) for v in config["std"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(
            f"{where}: data_config {config!r} is invalid ({err!r}); "
            "it needs input_size [C, H, W], mean and std lists of numbers"
        ) from None
    channels = out["input_size"][0] if len(out["input_size"]) == 3 else -1
    if channels < 1 or len(out["mean"]) != channels or len(out["std"]) != channels:
        raise ModelError(
            f"{where}: data_config input_size={out['input_size']} mean={out['mean']} std={out['std']} "
            "do not agree; use input_size [C, H, W] with C values in mean and in std"
        )
    if not all(math.isfinite(s) and s > 0 for s in out["std"]) or not all(map(math.isfinite, out["mean"])):
        raise ModelError(f"{where}: data_config std={out['std']} mean={out['mean']} must be finite, std > 0")
    return out


def _default_data_config(timm_name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Preprocessing from the architecture's own pretrained_cfg (never guessed from its name)."""
    pretrained_cfg = get_pretrained_cfg(timm_name)
    return resolve_data_config(args=dict(overrides or {}), pretrained_cfg=pretrained_cfg.to_dict())


def _similarity(typed: str, candidate: str) -> float:
    """Whole-name or prefix similarity, so a truncated name still finds the full timm name."""
    whole = difflib.SequenceMatcher(None, typed, candidate).ratio()
    return max(whole, difflib.SequenceMatcher(None, typed, candidate[: len(typed)]).ratio())


def suggest_names(name: str, limit: int = 3) -> list[str]:
    """Up to ``limit`` close names: the closest alias first, then timm names by (prefix) similarity."""
    typed = name.lower()
    aliases = difflib.get_close_matches(typed, ALIASES, n=1, cutoff=SUGGEST_CUTOFF)
    scored = sorted((-_similarity(typed, c), len(c), c) for c in timm.list_models())
    names = [c for score, _, c in scored[:limit] if -score >= SUGGEST_CUTOFF]
    return [*aliases, *names][:limit]


def _absolute_checkpoint(path: str | Path, where: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ModelError(f"{where}: checkpoint {path} does not exist; pass a .safetensors, .pth or .pt file")
    return str(resolved)


def _read_card(card_path: Path) -> dict[str, Any]:
    if not card_path.is_file():
        raise ModelError(f"model card {card_path} does not exist; pass an alias, a timm model name or a card")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"model card {card_path} is not valid JSON ({err}); see shared/README.md") from None
    if not isinstance(card, dict):
        raise ModelError(f"model card {card_path} must be a JSON object with timm_name and data_config")
    return card


def _check_card_fields(card: Mapping[str, Any], where: str) -> None:
    """Reject cards whose fields have the wrong type, before timm fails with an obscure message."""
    timm_name = card.get("timm_name")
    if not isinstance(timm_name, str) or not timm.is_model(timm_name):
        hint = f"; close names: {', '.join(suggest_names(timm_name))}" if isinstance(timm_name, str) else ""
        raise ModelError(f"{where}: timm_name={timm_name!r} is not a timm model name{hint}")
    if not isinstance(card.get("kwargs", {}), dict):
        raise ModelError(f"{where}: kwargs must be a JSON object of timm.create_model arguments")
    data_config = card.get("data_config")
    if not isinstance(data_config, dict) or any(k not in data_config for k in CARD_REQUIRED_DATA_KEYS):
        required = ", ".join(CARD_REQUIRED_DATA_KEYS)
        raise ModelError(f"{where}: data_config must be an object with at least {required}")
    if not isinstance(card.get("checkpoint", ""), (str, type(None))):
        raise ModelError(f"{where}: checkpoint must be a file name relative to the card's folder")
    classes = card.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ModelError(f"{where}: classes must be a list of class folder names in label order")
    if card.get("pruning") is not None:
        try:
            PrunedStructure.from_json_dict(card["pruning"])
        except LrpqError as err:
            raise ModelError(f"{where}: pruning: {err}") from None


def _size_pair(size: Any, where: str) -> tuple[int, int]:
    """An image size given as ``S`` or ``[H, W]`` (timm's two forms) as (H, W)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return size[0], size[1]
    raise ModelError(f"{where}: img_size={size!r} must be an integer or [H, W]")


def check_input_size(timm_name: str, kwargs: Mapping[str, Any], data_config: Mapping[str, Any], where: str) -> None:
    """Refuse preprocessing whose image size the model would reject (timm only asserts at the first forward).

    The model's size is ``kwargs["img_size"]`` when given, else its architecture's default when that
    architecture takes one fixed size; models built with ``dynamic_img_size`` take any size.
    """
    if kwargs.get("dynamic_img_size"):
        return
    size = kwargs.get("img_size")
    if size is None:
        pretrained_cfg = get_pretrained_cfg(timm_name)
        if pretrained_cfg is None or not pretrained_cfg.fixed_input_size:
            return
        size, origin = pretrained_cfg.input_size[1:], f"{timm_name}'s default input size"
    else:
        origin = "kwargs img_size"
    expected, given = _size_pair(size, where), tuple(data_config["input_size"][1:])
    if given != expected:
        raise ModelError(
            f"{where}: data_config input_size {given[0]}×{given[1]} does not match {origin} "
            f"{expected[0]}×{expected[1]}; make them agree"
        )


def _spec_from_card(source: str, card_path: Path, checkpoint: str | None) -> ModelSpec:
    card = _read_card(card_path)
    where = f"model card {card_path}"
    _check_card_fields(card, where)
    data_config = _normalize_data_config(card["data_config"], where)  # before timm's resolver, which only asserts
    check_input_size(card["timm_name"], card.get("kwargs", {}), data_config, where)
    if checkpoint is None and card.get("checkpoint") is not None:
        checkpoint = _absolute_checkpoint(card_path.parent / card["checkpoint"], where)
    return ModelSpec(
        source=source,
        timm_name=card["timm_name"],
        kwargs=dict(card.get("kwargs", {})),
        checkpoint=checkpoint,
        data_config=_default_data_config(card["timm_name"], card["data_config"]),
        classes=card.get("classes"),
        pretrained=checkpoint is None,
        pruning=card.get("pruning"),
    )


def _looks_like_card(name: str) -> bool:
    return name.endswith(".json") or Path(name).is_file()


def resolve_model(name: str, checkpoint: str | None = None) -> ModelSpec:
    """Resolve an alias, timm name or model-card path; an explicit checkpoint overrides the card's."""
    if checkpoint is not None:
        checkpoint = _absolute_checkpoint(checkpoint, f"model {name}")
    if (Path(name) / PRUNED_CARD).is_file():  # a pruned run directory stands for its card
        return _spec_from_card(name, (Path(name) / PRUNED_CARD).expanduser().resolve(), checkpoint)
    if _looks_like_card(name):
        return _spec_from_card(name, Path(name).expanduser().resolve(), checkpoint)
    timm_name = ALIASES.get(name, name)
    if not timm.is_model(timm_name):
        close = suggest_names(name)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()`"
        raise ModelError(f"unknown model {name!r}: {hint} (or an alias {', '.join(ALIASES)} or a card .json)")
    return ModelSpec(
        source=name,
        timm_name=timm_name,
        checkpoint=checkpoint,
        data_config=_default_data_config(timm_name),
        pretrained=checkpoint is None,
    )


def _create(spec: ModelSpec) -> nn.Module:
    try:
        return timm.create_model(spec.timm_name, pretrained=spec.pretrained, **spec.kwargs)
    except TypeError as err:
        raise ModelError(f"{spec.source}: {spec.timm_name} rejects kwargs {spec.kwargs} ({err})") from None
    except OSError as err:
        if not spec.pretrained:
            raise
        raise ModelError(
            f"could not download pretrained weights for {spec.timm_name} ({type(err).__name__}); "
            "pass --checkpoint PATH to a local .safetensors/.pth file"
        ) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read safetensors or torch checkpoints (optionally nested under state_dict/model) as float32."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files raise many types (SafetensorError, UnpicklingError, EOFError...)
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ModelError(f"checkpoint {path} could not be read ({reason})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds {type(state).__name__}; expected a state dict of tensors")
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}


def _listed(keys: list[str]) -> str:
    extra = len(keys) - MAX_LISTED_KEYS
    return ", ".join(keys[:MAX_LISTED_KEYS]) + (f" (+{extra} more)" if extra > 0 else "")


def _mismatch_summary(model: nn.Module, state: Mapping[str, Any]) -> str:
    """One-line diff of a checkpoint against the model, since torch's message spans many lines."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if torch.is_tensor(state[k]) and state[k].shape != expected[k].shape
    ]
    sections = {"missing": missing, "unexpected": unexpected, "shape (checkpoint vs model)": shapes}
    parts = [f"{label}: {_listed(keys)}" for label, keys in sections.items() if keys]
    return "; ".join(parts) or "incompatible values"


def build_model(spec: ModelSpec) -> nn.Module:
    """Create the timm model (cut to the spec's pruning) in eval mode; load the checkpoint strictly, in float32."""
    model = _create(spec)
    if spec.pruning is not None:
        apply_structure(model, PrunedStructure.from_json_dict(spec.pruning))
    if spec.checkpoint is not None:
        state = load_state_dict_file(spec.checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError:
            raise ModelError(
                f"checkpoint {spec.checkpoint} does not fit {spec.timm_name} {spec.kwargs}: "
                f"{_mismatch_summary(model, state)}"
            ) from None
    return model.float().eval()
