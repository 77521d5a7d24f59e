"""Pruned run directories: a model card and its weights that every other lrpq command loads as a model.

``lrpq prune … --out RUN_DIR`` writes

- ``model.json``: a model card (``timm_name``, ``kwargs`` of the *unpruned* architecture, ``checkpoint``,
  ``data_config``, ``classes``) plus ``pruning``, the kept heads and hidden channels of every block
  (``lrpq.prune.structure``); ``lrpq.models.build_model`` creates the model with the kwargs, cuts it
  to ``pruning`` and loads the checkpoint strictly. Pruning a pruned card again composes the two.
- ``model.safetensors``: the pruned (and refit) float32 state dict.
- ``summary.json`` / ``summary.txt``: criterion, fractions, parameters and FLOPs before and after,
  per-block kept units, per-layer refit errors, sparsity.
- ``scores.json``: the unit scores (``UnitScores``), when units were scored.

It is written through a staging folder (``staged_pruned_run``), made before any work, so an unusable
``--out`` fails at once and a failed prune leaves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from lrpq.models import PRUNED_CARD, ModelSpec
from lrpq.outputs import staged_dir
from lrpq.prune.pipeline import PruneResult
from lrpq.prune.structure import PrunedStructure
from lrpq.runs import MODEL_FILE

SCORES_FILE = "scores.json"


def pruned_card(spec: ModelSpec, structure: PrunedStructure) -> dict[str, Any]:
    """The card of ``spec``'s model pruned to ``structure`` (composed with the spec's own pruning, if any)."""
    if spec.pruning is not None:
        structure = PrunedStructure.from_json_dict(spec.pruning).then(structure)
    return {
        "timm_name": spec.timm_name,
        "kwargs": spec.kwargs,
        "checkpoint": MODEL_FILE,
        "data_config": spec.to_json_dict()["data_config"],
        "classes": spec.classes,
        "pruned_from": spec.source,
        "pruning": structure.to_json_dict(),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Flat facts, then one row per block: heads and hidden channels kept."""
    lines = [f"{key:<20} {value}" for key, value in summary.items() if not isinstance(value, dict | list)]
    kept = summary["kept"]
    width = max(len(name) for name in kept)
    lines += ["", f"{'block':<{width}}  heads  hidden", f"{'-' * width}  -----  ------"]
    lines += [f"{name:<{width}}  {k['heads']:>5}  {k['hidden']:>6}" for name, k in kept.items()]
    return "\n".join(lines) + "\n"


def is_pruned_run(path: str | Path) -> bool:
    """A folder ``lrpq prune`` wrote, which ``--overwrite`` may replace: its card and weights."""
    return (Path(path) / PRUNED_CARD).is_file() and (Path(path) / MODEL_FILE).is_file()


@contextmanager
def staged_pruned_run(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden folder beside ``out_dir``, made now, that becomes the pruned run directory on success."""
    with staged_dir(out_dir, what="pruned run directory", overwrite=overwrite, replaceable=is_pruned_run) as staging:
        yield staging


def write_pruned_run(folder: Path, result: PruneResult, spec: ModelSpec) -> dict[str, Any]:
    """Write the files of a pruned run into ``folder`` (a staging folder); returns the summary written."""
    summary = {"model": spec.source, "timm_name": spec.timm_name, **result.summary()}
    state = {name: tensor.contiguous() for name, tensor in result.model.state_dict().items()}
    save_file(state, str(folder / MODEL_FILE))
    (folder / PRUNED_CARD).write_text(json.dumps(pruned_card(spec, result.structure), indent=1) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.txt").write_text(format_summary(summary))
    if result.scores is not None:
        result.scores.save(folder / SCORES_FILE)
    return summary


def save_pruned_run(
    out_dir: str | Path, result: PruneResult, spec: ModelSpec, *, overwrite: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Write ``result`` as a pruned run directory; returns its path and the summary written."""
    with staged_pruned_run(out_dir, overwrite) as staging:
        summary = write_pruned_run(staging, result, spec)
    return Path(out_dir), summary
