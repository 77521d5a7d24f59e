"""Relevance report on disk: scores.json, scores.csv, importance.png and heatmap_<k>.png.

The report is built in a hidden sibling directory and renamed into place only when every file is
written (``lrpq.outputs.staged_dir``), so a failure (bad heat map, full disk, Ctrl-C, SIGTERM) never
leaves a half-written report behind, and an existing report is never replaced.
Figures use matplotlib's object API with the Agg canvas, so no global backend is switched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from lrpq.config import BitPlan
from lrpq.outputs import staged_dir
from lrpq.relevance.layer_scores import LayerScores
from lrpq.relevance.propagation import RelevanceError

ImageLike = torch.Tensor | Image.Image | np.ndarray
MapLike = torch.Tensor | np.ndarray
HEATMAP_ALPHA = 0.5
REPORT_KIND = "relevance report"  # how errors about the report folder name it


def _short_name(name: str, block: str) -> str:
    """Layer name inside its block (``attn.qkv``), which is what tells bars in one group apart."""
    return name[len(block) + 1 :] if name.startswith(f"{block}.") else name


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def plot_importance(scores: LayerScores, path: str | Path, plan: BitPlan | None = None) -> None:
    """Bar chart of relative importance, one group of bars per block, bits on top when planned."""
    relative = scores.relative()
    kinds = list(dict.fromkeys(_short_name(name, scores.block_of[name]) for name in scores.scores))
    colors = {kind: f"C{index % 10}" for index, kind in enumerate(kinds)}
    positions, centers, x = [], [], 0.0
    for block in scores.block_order:
        names = [name for name in scores.scores if scores.block_of[name] == block]
        positions.extend((name, x + offset) for offset, name in enumerate(names))
        centers.append(x + (len(names) - 1) / 2)
        x += len(names) + 1
    figure = Figure(figsize=(max(8.0, 0.16 * x + 2), 4.5))
    axes = figure.add_subplot()
    for name, position in positions:
        kind = _short_name(name, scores.block_of[name])
        axes.bar(position, relative[name], color=colors[kind], width=0.85, label=kind)
        bits = plan.layers.get(name) if plan is not None else None
        if bits is not None:
            label = f"W{bits.wbits}A{bits.abits}"
            axes.text(position, relative[name], label, rotation=90, ha="center", va="bottom", fontsize=6)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes.legend(unique.values(), unique.keys(), fontsize=7, ncol=min(len(unique), 8), loc="upper right")
    axes.set_xticks(centers, scores.block_order, rotation=90, fontsize=7)
    axes.set_ylim(0, max(relative.values(), default=1.0) * (1.35 if plan is not None else 1.15))
    axes.set_ylabel("relative importance (score / block total)")
    axes.set_title(f"LRP-QViT layer importance over {scores.num_images} images")
    _save(figure, Path(path))


def _image_array(image: ImageLike) -> np.ndarray:
    """(H, W, 3) float array in [0, 1] from a PIL image or an unnormalised (C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        shape = tuple(array.shape)
        raise RelevanceError(f"heat-map image must be a PIL image or a (C, H, W) array, got shape {shape}")
    return np.clip(np.repeat(array, 3 // array.shape[0], 0).transpose(1, 2, 0), 0.0, 1.0)


def _map_array(heat: MapLike) -> np.ndarray:
    array = heat.detach().cpu().float().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, float)
    if array.ndim != 2:
        raise RelevanceError(f"heat map must be (H, W), got shape {array.shape}")
    return array


def _show(axes: Axes, picture: np.ndarray, heat: np.ndarray | None, title: str) -> None:
    """The picture, with ``heat`` as a jet overlay stretched to its extent when given."""
    height, width = picture.shape[:2]
    extent = (0, width, height, 0)
    axes.imshow(picture, extent=extent)
    if heat is not None:
        axes.imshow(heat, cmap="jet", alpha=HEATMAP_ALPHA, extent=extent, vmin=0.0, vmax=1.0)
    axes.set_title(title, fontsize=9)
    axes.axis("off")


def save_heatmap(image: ImageLike, maps: Mapping[str, MapLike], path: str | Path, title: str = "") -> None:
    """The image, then one jet overlay per named map, side by side, stretched to the image's extent."""
    picture = _image_array(image)
    arrays = {name: _map_array(heat) for name, heat in maps.items()}
    figure = Figure(figsize=(3.2 * (1 + len(arrays)), 3.6))
    panels = figure.subplots(1, 1 + len(arrays), squeeze=False)[0]
    _show(panels[0], picture, None, "image")
    for axes, (name, array) in zip(panels[1:], arrays.items(), strict=True):
        _show(axes, picture, array, name)
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, Path(path))


def save_heatmap_grid(
    overlays: Sequence[tuple[ImageLike, MapLike, str]], path: str | Path, title: str = "", columns: int = 5
) -> None:
    """Many images, each under its own map, in a grid: how a map method behaves beyond one example."""
    if not overlays or columns < 1:
        raise RelevanceError(f"a heat-map grid needs at least one image and one column, got {len(overlays)}")
    columns = min(columns, len(overlays))
    rows = -(-len(overlays) // columns)
    figure = Figure(figsize=(3.0 * columns, 3.2 * rows))
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, (image, heat, name) in zip(panels, overlays, strict=False):
        _show(axes, _image_array(image), _map_array(heat), name)
    for axes in panels[len(overlays) :]:
        axes.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, Path(path))


def write_report_files(
    folder: Path,
    scores: LayerScores,
    plan: BitPlan | None = None,
    heatmaps: Iterable[tuple[ImageLike, MapLike, str]] = (),
) -> None:
    """Write scores.json, scores.csv, importance.png and heatmap_<k>.png into ``folder`` (a staging folder).

    ``heatmaps`` holds (unnormalised image tensor or PIL image, (H, W) map in [0, 1], title).
    """
    scores.save(folder / "scores.json")
    scores.save_csv(folder / "scores.csv")
    plot_importance(scores, folder / "importance.png", plan)
    for index, (image, heat, title) in enumerate(heatmaps):
        save_heatmap(image, {"relevance": heat}, folder / f"heatmap_{index}.png", title)


def write_relevance_report(
    scores: LayerScores,
    out_dir: str | Path,
    plan: BitPlan | None = None,
    heatmaps: Iterable[tuple[ImageLike, MapLike, str]] = (),
) -> Path:
    """Write the report files (``write_report_files``) into a new ``out_dir``, all of them or none.

    An existing non-empty ``out_dir`` is refused rather than overwritten.
    """
    with staged_dir(out_dir, what=REPORT_KIND) as staging:
        write_report_files(staging, scores, plan, heatmaps)
    return Path(out_dir)
