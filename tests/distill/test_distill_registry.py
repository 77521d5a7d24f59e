"""``--recover`` specs: names, weights and the errors a user sees."""

from __future__ import annotations

import pytest
import torch
from distill_synthetic import BATCH, copy_of, teacher_features

from lrpq.distill import (
    LOSSES,
    BlockMSE,
    CRDLoss,
    DistillError,
    FeatureShapes,
    FitNetLoss,
    KDLoss,
    UnknownLossError,
    build_loss,
    parse_spec,
)
from lrpq.errors import LrpqError

CLI_NAMES = [
    "kd",
    "fitnet",
    "at",
    "sp",
    "cc",
    "vid",
    "rkd",
    "pkt",
    "ab",
    "ft",
    "fsp",
    "nst",
    "crd",
    "ofd",
    "mse",
    "nmse",
]


def _shapes(num_images: int | None = BATCH) -> FeatureShapes:
    return FeatureShapes.of(teacher_features(), num_images=num_images)


def test_the_catalogue_has_the_sixteen_cli_names() -> None:
    assert sorted(LOSSES) == sorted(CLI_NAMES)


@pytest.mark.parametrize("name", CLI_NAMES)
def test_every_name_builds(name: str) -> None:
    loss = build_loss(name, _shapes())
    assert list(loss.terms) == [name]


def test_weighted_sum_equals_the_terms_by_hand() -> None:
    teacher = teacher_features()
    student = copy_of(teacher, noise=0.5)
    combined = build_loss("kd:0.5+mse", _shapes())
    expected = 0.5 * KDLoss()(student, teacher) + BlockMSE()(student, teacher)
    torch.testing.assert_close(combined(student, teacher), expected)
    components = combined.components(student, teacher)
    torch.testing.assert_close(components["kd"], 0.5 * KDLoss()(student, teacher))


def test_spec_parsing() -> None:
    assert parse_spec("kd:0.5+mse") == {"kd": 0.5, "mse": 1.0}
    assert parse_spec(" KD : 2 + Mse ") == {"kd": 2.0, "mse": 1.0}


def test_combined_loss_owns_the_learnable_parts_of_its_terms() -> None:
    combined = build_loss("fitnet+vid:0.1", _shapes())
    names = {name for name, _ in combined.named_parameters()}
    assert any(name.startswith("terms.fitnet.") for name in names)
    assert any(name.startswith("terms.vid.") for name in names)


def test_unknown_name_is_one_line_listing_the_accepted_names() -> None:
    with pytest.raises(UnknownLossError) as raised:
        build_loss("mse+hint", _shapes())
    message = str(raised.value)
    assert isinstance(raised.value, LrpqError)
    assert "\n" not in message and "'hint'" in message
    assert all(name in message for name in CLI_NAMES)


@pytest.mark.parametrize("spec", ["kd:abc", "kd:-1", "kd:0", "kd:", "kd:inf", "kd+kd", "", "kd+"])
def test_malformed_specs_raise(spec: str) -> None:
    with pytest.raises(UnknownLossError):
        parse_spec(spec)


def test_crd_needs_the_number_of_images_and_fewer_negatives_than_images() -> None:
    with pytest.raises(DistillError, match="number of calibration images"):
        build_loss("crd", _shapes(num_images=None))
    with pytest.raises(DistillError, match="K must be"):
        CRDLoss(_shapes(num_images=4), negatives=4)
    assert CRDLoss(_shapes(num_images=32)).negatives == 31


def test_crd_without_index_says_so() -> None:
    teacher = teacher_features()
    teacher.index = None
    with pytest.raises(DistillError, match="index"):
        build_loss("crd", _shapes())(copy_of(teacher), teacher)


def test_unknown_block_is_an_error() -> None:
    with pytest.raises(DistillError, match="block 7"):
        FitNetLoss(_shapes(), block=7)
