"""Image listing, labels, image modes, corrupt-image skipping, seeded calibration draws and the committed lists."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrpq.data import (
    DataError,
    build_transform,
    class_to_index,
    draw_calibration_set,
    evenly_spaced,
    list_images,
    load_calibration_images,
    make_loader,
    read_calibration_list,
    to_rgb,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference data not found at {SHARED}")
REPO = Path(__file__).resolve().parents[1]

CONFIG = {
    "input_size": (3, 8, 8),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
    "crop_mode": "center",
}
IMAGENETTE_SYNSETS = [
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
]


def save_png(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two classes of solid-colour PNGs (red, blue) plus one garbage .jpg."""
    root = tmp_path / "images"
    for i in range(2):
        save_png(root / "red" / f"{i}.png", (255, 0, 0))
        save_png(root / "blue" / f"{i}.png", (0, 0, 255))
    (root / "red" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "red" / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture
def twenty(tmp_path: Path) -> Path:
    root = tmp_path / "twenty"
    for i in range(20):
        save_png(root / f"c{i % 4}" / f"{i:02d}.png", (i, i, i))
    return root


def test_list_images_is_sorted_by_class_then_name(folder: Path) -> None:
    listed = [(p.relative_to(folder).as_posix(), c) for p, c in list_images(folder)]
    assert listed == [
        ("blue/0.png", "blue"),
        ("blue/1.png", "blue"),
        ("red/0.png", "red"),
        ("red/1.png", "red"),
        ("red/broken.jpg", "red"),
    ]


def test_missing_file_or_empty_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'absent'} does not exist")):
        list_images(tmp_path / "absent")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="is not a directory"):
        list_images(tmp_path / "file.png")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty'} has no images")):
        list_images(tmp_path / "empty")


def test_loader_skips_and_counts_corrupt_images(folder: Path) -> None:
    loader = make_loader(folder, CONFIG, classes=None, num_classes=2, batch_size=2)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) in .*broken\.jpg"):
        batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert loader.skipped == 1
    assert loader.num_images == 5
    assert labels.tolist() == [0, 0, 1, 1]  # blue=0, red=1 (sorted folder names)
    assert images.shape == (4, 3, 8, 8)
    # Solid blue normalised with mean=std=0.5 is exactly (-1, -1, 1).
    torch.testing.assert_close(images[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    torch.testing.assert_close(images[3, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_loader_counts_skips_made_in_worker_processes(folder: Path) -> None:
    loader = make_loader(folder, CONFIG, classes=["red", "blue"], num_classes=2, batch_size=4, workers=1)
    with pytest.warns(UserWarning, match="skipped 1"):
        labels = torch.cat([b[1] for b in loader])
    assert loader.skipped == 1
    assert labels.tolist() == [1, 1, 0, 0]  # card order: red=0, blue=1


def test_limit_spreads_over_classes(twenty: Path) -> None:
    assert evenly_spaced(list(range(20)), 4) == [0, 5, 10, 15]
    assert evenly_spaced(list(range(3)), 10) == [0, 1, 2]
    loader = make_loader(twenty, CONFIG, classes=None, num_classes=4, batch_size=8, limit=4)
    assert sorted(torch.cat([b[1] for b in loader]).tolist()) == [0, 1, 2, 3]
    with pytest.raises(DataError, match="limit=0"):
        make_loader(twenty, CONFIG, classes=None, num_classes=4, limit=0)


def test_class_to_index_rules() -> None:
    assert class_to_index(["b", "a"], ["b", "a", "c"], 3) == {"a": 1, "b": 0}
    with pytest.raises(DataError, match=r"\['zebra'\] are not in the model's classes"):
        class_to_index(["a", "zebra"], ["a", "b"], 2)
    assert class_to_index(["dog", "cat"], None, 10) == {"cat": 0, "dog": 1}
    with pytest.raises(DataError, match="3 class folders but the model predicts 2"):
        class_to_index(["a", "b", "c"], None, 2)


def test_imagenette_synsets_map_to_imagenet_indices() -> None:
    mapping = class_to_index(IMAGENETTE_SYNSETS, None, 1000)
    assert [mapping[s] for s in IMAGENETTE_SYNSETS] == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    # A 10-class head trained on the synset folders keeps sorted 0..9 labels.
    assert list(class_to_index(IMAGENETTE_SYNSETS, None, 10).values()) == list(range(10))


def test_calibration_draw_is_seeded(twenty: Path) -> None:
    first = draw_calibration_set(twenty, 8, seed=0)
    assert first == draw_calibration_set(twenty, 8, seed=0)
    assert first != draw_calibration_set(twenty, 8, seed=1)
    assert len(set(first)) == 8
    assert set(first) <= {p for p, _ in list_images(twenty)}
    assert draw_calibration_set(twenty, 20, seed=3) != sorted(draw_calibration_set(twenty, 20, seed=3))


def test_calibration_draw_larger_than_folder(twenty: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"asked for 32 calibration images but {twenty} has 20")):
        draw_calibration_set(twenty, 32, seed=0)
    with pytest.raises(DataError, match="asked for 0"):
        draw_calibration_set(twenty, 0, seed=0)


def test_load_calibration_images_skips_unreadable(folder: Path) -> None:
    paths = [p for p, _ in list_images(folder)]
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable calibration image\(s\)"):
        batch = load_calibration_images(paths, CONFIG)
    assert batch.shape == (4, 3, 8, 8)
    assert torch.isfinite(batch).all()
    assert batch.min().item() == -1.0 and batch.max().item() == 1.0
    with pytest.raises(DataError, match="none of the 2 calibration images"):
        load_calibration_images([folder / "red" / "broken.jpg", folder / "absent.png"], CONFIG)
    with pytest.raises(DataError, match="no calibration images given"):
        load_calibration_images([], CONFIG)


def test_zero_std_is_rejected_before_it_makes_inf() -> None:
    with pytest.raises(DataError, match=re.escape("std=[0.5, 0.0, 0.5]")):
        build_transform({**CONFIG, "std": [0.5, 0.0, 0.5]})
    with pytest.raises(DataError, match=re.escape("mean=[0.5, nan, 0.5]")):
        build_transform({**CONFIG, "mean": [0.5, float("nan"), 0.5]})


def test_read_calibration_list(folder: Path, tmp_path: Path) -> None:
    list_file = tmp_path / "list.txt"
    list_file.write_text("# comment\nred/0.png\n\nblue/1.png\n")
    assert read_calibration_list(list_file, folder) == [folder / "red" / "0.png", folder / "blue" / "1.png"]
    with pytest.raises(DataError, match=r"2 file\(s\) not under"):
        read_calibration_list(list_file, folder / "red")
    with pytest.raises(DataError, match=r"absent\.txt does not exist"):
        read_calibration_list(tmp_path / "absent.txt", folder)


@needs_shared
@pytest.mark.parametrize("dataset", ["cifar10", "imagenette"])
def test_committed_calibration_lists_match_a_fresh_draw(dataset: str) -> None:
    data = SHARED / "data" / dataset / "calib"
    committed = read_calibration_list(REPO / "calib" / f"{dataset}_seed0_n32.txt", data)
    assert committed == draw_calibration_set(data, 32, 0)
    assert len(committed) == 32


def gradient_16bit(path: Path) -> np.ndarray:
    """An 8×8 grayscale image whose 64 pixels climb from 0 to 65535, saved as a 16-bit PNG."""
    values = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # what PIL reads a 16-bit grayscale PNG as
    return values


def expected_normalised(values: np.ndarray) -> torch.Tensor:
    """CONFIG's normalisation (mean = std = 0.5) of the 8-bit grey levels ``round(v / 257)``, on 3 channels."""
    grey = torch.from_numpy(np.round(values / 257.0)).float() / 255.0
    return ((grey - 0.5) / 0.5).expand(3, 8, 8)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(mode: str) -> None:
    values = (np.arange(256, dtype=np.int64) * 257).reshape(16, 16)  # every 8-bit level widened to 16 bits
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    image = Image.frombytes(mode, (16, 16), values.astype(dtype).tobytes())
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert (rgb == np.arange(256).reshape(16, 16, 1)).all()  # each level comes back exactly, on all channels


def test_16_bit_png_through_the_evaluation_and_calibration_loaders(tmp_path: Path) -> None:
    values = gradient_16bit(tmp_path / "grey" / "cls" / "gradient.png")
    expected = expected_normalised(values)
    loader = make_loader(tmp_path / "grey", CONFIG, classes=None, num_classes=1, batch_size=1)
    (evaluated, _), *_ = list(loader)
    calibrated = load_calibration_images([tmp_path / "grey" / "cls" / "gradient.png"], CONFIG)
    for batch in (evaluated, calibrated):
        torch.testing.assert_close(batch[0], expected, atol=1e-6, rtol=0)
        flat = batch[0, 0].flatten()
        assert flat[0] == -1.0 and flat[-1] == 1.0  # 0 → black, 65535 → white
        assert (flat.diff() > 0).all()  # monotone: the gradient survives, not a white image


@pytest.mark.parametrize(
    ("mode", "colour", "rgb"),
    [
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("L", 77, (77, 77, 77)),
        ("LA", (77, 255), (77, 77, 77)),
        ("RGBA", (10, 20, 30, 128), (10, 20, 30)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),  # 128 · 257
    ],
)
def test_every_mode_becomes_the_rgb_it_shows(mode: str, colour: object, rgb: tuple[int, int, int]) -> None:
    image = Image.new(mode, (2, 2), colour)
    assert tuple(np.asarray(to_rgb(image))[0, 0]) == rgb


def test_palette_images_keep_their_colours() -> None:
    image = Image.new("RGB", (2, 1), (200, 10, 10))
    image.putpixel((1, 0), (10, 10, 200))
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    assert palette.mode == "P"
    assert np.asarray(to_rgb(palette)).tolist() == [[[200, 10, 10], [10, 10, 200]]]
