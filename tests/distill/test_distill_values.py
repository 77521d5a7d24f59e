"""Each loss on tiny hand-made features equals the value worked out by hand (plain Python, no torch maths)."""

from __future__ import annotations

import math

import pytest
import torch
from distill_synthetic import embeddings_only, tokens_only

from lrpq.distill import (
    ABLoss,
    ATLoss,
    BlockMSE,
    CCLoss,
    ChannelNormalisedMSE,
    CRDLoss,
    DistillFeatures,
    FactorTransferLoss,
    FeatureShapes,
    FitNetLoss,
    FSPLoss,
    KDLoss,
    NSTLoss,
    OFDLoss,
    PKTLoss,
    RKDLoss,
    SPLoss,
    VIDLoss,
)

SQRT2, SQRT5 = math.sqrt(2), math.sqrt(5)


def value(loss: torch.nn.Module, student: DistillFeatures, teacher: DistillFeatures) -> float:
    return loss(student, teacher).item()


def test_kd_two_rows_of_three_classes_at_t2() -> None:
    student, teacher = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], [[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]]
    t = 2.0

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(z / t) for z in row]
        return [e / sum(exps) for e in exps]

    kl_rows = [
        sum(q * (math.log(q) - math.log(p)) for p, q in zip(softmax(s), softmax(r), strict=True))
        for s, r in zip(student, teacher, strict=True)
    ]
    expected = t * t * sum(kl_rows) / 2
    s = DistillFeatures(logits=torch.tensor(student), tokens=[], embedding=torch.zeros(2, 1))
    r = DistillFeatures(logits=torch.tensor(teacher), tokens=[], embedding=torch.zeros(2, 1))
    assert value(KDLoss(temperature=t), s, r) == pytest.approx(expected, rel=1e-6)


def test_mse_sums_the_blocks_means() -> None:
    student = tokens_only([[[1, 2]]], [[[1, 1]]])
    teacher = tokens_only([[[0, 0]]], [[[1, 3]]])
    assert value(BlockMSE(), student, teacher) == pytest.approx((1 + 4) / 2 + (0 + 4) / 2)


def test_normalised_mse_weighs_each_channel_by_the_teachers_power() -> None:
    # Block 0: one image, two tokens, two channels. Teacher powers: channel 0 (1² + 3²)/2 = 5, channel 1
    # (2² + 0²)/2 = 2. Squared errors: (1, 4) and (4, 1); weighted: 1/5, 4/2, 4/5, 1/2, mean 0.875.
    # Block 1: a channel of zeros gets the floor 10⁻⁶ · mean power (10⁻⁶ · 9/2), where its error is 0.
    student = tokens_only([[[2, 0], [1, 1]]], [[[0, 1]]])
    teacher = tokens_only([[[1, 2], [3, 0]]], [[[0, 3]]])
    block1 = (0 / 4.5e-6 + (1 - 3) ** 2 / 9) / 2
    assert value(ChannelNormalisedMSE(), student, teacher) == pytest.approx((0.875 + block1) / 2)


def test_fitnet_at_identity_initialisation_is_the_hint_mse() -> None:
    student, teacher = tokens_only([[[1, 2], [3, 4]]]), tokens_only([[[1, 0], [3, 5]]])
    loss = FitNetLoss(FeatureShapes.of(teacher))
    assert value(loss, student, teacher) == pytest.approx((0 + 4 + 0 + 1) / 4)


def test_at_maps_tokens_by_mean_squared_channel() -> None:
    # q_s = (mean(1,1), mean(4,0)) = (1, 2) → (1, 2)/√5; q_t = (mean(0,4), mean(1,1)) = (2, 1) → (2, 1)/√5.
    student, teacher = tokens_only([[[1, 1], [2, 0]]]), tokens_only([[[0, 2], [1, 1]]])
    expected = ((1 / SQRT5 - 2 / SQRT5) ** 2 + (2 / SQRT5 - 1 / SQRT5) ** 2) / 2
    assert value(ATLoss(), student, teacher) == pytest.approx(expected)


def test_sp_compares_row_normalised_batch_grams() -> None:
    # Samples flattened: student (1, 0), (1, 1) → G = [[1, 1], [1, 2]]; teacher (1, 0), (0, 1) → G = I.
    student, teacher = tokens_only([[[1, 0]], [[1, 1]]]), tokens_only([[[1, 0]], [[0, 1]]])
    g_student = [[1 / SQRT2, 1 / SQRT2], [1 / SQRT5, 2 / SQRT5]]
    g_teacher = [[1, 0], [0, 1]]
    squared = sum((g_teacher[i][j] - g_student[i][j]) ** 2 for i in range(2) for j in range(2))
    assert value(SPLoss(), student, teacher) == pytest.approx(squared / 4)


def test_fsp_gram_between_consecutive_blocks_over_tokens() -> None:
    # G = bottomᵀ · top / N with N = 2 tokens: student [[.5, 1], [1.5, 2]], teacher [[.5, 1], [2, 3]].
    student = tokens_only([[[1, 0], [0, 1]]], [[[1, 2], [3, 4]]])
    teacher = tokens_only([[[1, 1], [0, 1]]], [[[1, 2], [3, 4]]])
    assert value(FSPLoss(), student, teacher) == pytest.approx((0 + 0 + 0.5**2 + 1**2) / 4)


def test_fsp_skips_pairs_across_a_change_of_token_grid() -> None:
    same = tokens_only([[[1, 0], [0, 1]]], [[[1, 2], [3, 4]]], [[[1, 2]]])
    other = tokens_only([[[1, 1], [0, 1]]], [[[1, 2], [3, 4]]], [[[5, 6]]])
    assert value(FSPLoss(), same, other) == pytest.approx(0.3125)


def test_nst_mmd_of_channels_token_patterns() -> None:
    # Channels over tokens, normalised: student (1, 1)/√2 and (0, 1); teacher (1, 0) and (0, 1).
    # mean (x·y)²: teacher–teacher [[1, 0], [0, 1]] → 1/2; student–student [[1, 1/2], [1/2, 1]] → 3/4;
    # student–teacher [[1/2, 1/2], [0, 1]] → 1/2.  MMD² = 1/2 + 3/4 − 2 · 1/2.
    student, teacher = tokens_only([[[1, 0], [1, 1]]]), tokens_only([[[1, 0], [0, 1]]])
    assert value(NSTLoss(), student, teacher) == pytest.approx(0.25)


def test_vid_at_initialisation_is_the_gaussian_nll_with_variance_5() -> None:
    student, teacher = tokens_only([[[1, 2]]]), tokens_only([[[0, 0]]])
    loss = VIDLoss(FeatureShapes.of(teacher))
    expected = (0.5 * (1 / 5 + math.log(5)) + 0.5 * (4 / 5 + math.log(5))) / 2
    assert value(loss, student, teacher) == pytest.approx(expected, rel=1e-5)


def test_ab_hinges_on_the_teachers_signs_with_margin_1() -> None:
    # (s, t): (.5, −1) → (.5 + 1)²; (−2, −1) → 0; (.5, 1) → (.5 − 1)²; (2, 1) → 0.  Sum 2.5, scale 3/1000.
    student, teacher = tokens_only([[[0.5, -2, 0.5, 2]]]), tokens_only([[[-1, -1, 1, 1]]])
    assert value(ABLoss(), student, teacher) == pytest.approx(2.5 * 3e-3)
    # Two blocks: weights 2^(i − k + 1) = 1/2, 1.
    twice_s = tokens_only(*student.tokens, *student.tokens)
    twice_t = tokens_only(*teacher.tokens, *teacher.tokens)
    assert value(ABLoss(), twice_s, twice_t) == pytest.approx((0.5 + 1) * 2.5 * 3e-3)


def test_ofd_partial_l2_against_the_margin_clipped_teacher() -> None:
    # Channel 0: teacher (−2, −4), margin = mean of negatives = −3, target (−2, −3); student (−1, −5):
    #   −1 > −2 → (−1 + 2)² = 1; −5 ≤ −3 and target ≤ 0 → skipped.
    # Channel 1: teacher (1, 3) has no negatives (margin 0), target (1, 3) > 0 → (1 − 1)² + (0 − 3)² = 9.
    student, teacher = tokens_only([[[-1, 1], [-5, 0]]]), tokens_only([[[-2, 1], [-4, 3]]])
    loss = OFDLoss(FeatureShapes.of(teacher))
    assert value(loss, student, teacher) == pytest.approx(10 * 1e-4)


def test_ft_at_initialisation_compares_normalised_top_singular_factors() -> None:
    # Teacher tokens diag(3, 1): the top right singular vector is ±e₁, one factor (rate ½ of width 2).
    # Factors: teacher (3, 0) → (1, 0); student (1, 1) → (1, 1)/√2; mean |difference| = (1 − 1/√2 + 1/√2) / 2.
    student, teacher = tokens_only([[[1, 1], [1, 0]]]), tokens_only([[[3, 0], [0, 1]]])
    loss = FactorTransferLoss(FeatureShapes.of(teacher))
    assert value(loss, student, teacher) == pytest.approx(0.5, abs=1e-6)
    assert loss.fitted and torch.equal(loss.translator.weight, loss.paraphraser)


def test_cc_taylor_rbf_correlations_of_normalised_embeddings() -> None:
    gamma = 0.4

    def kernel(cosine: float) -> float:
        return math.exp(-2 * gamma) * sum((2 * gamma * cosine) ** p / math.factorial(p) for p in range(3))

    # Student cosines: 0 off the diagonal; teacher: 1/√2. The diagonals (cosine 1) agree.
    student, teacher = embeddings_only([[1, 0], [0, 1]]), embeddings_only([[1, 0], [1, 1]])
    expected = 2 * (kernel(1 / SQRT2) - kernel(0)) ** 2 / 4
    assert value(CCLoss(), student, teacher) == pytest.approx(expected, rel=1e-5)


def test_pkt_kl_of_cosine_conditionals() -> None:
    # Student cosines I → kernel [[1, ½], [½, 1]] → rows (2/3, 1/3); teacher all 1 → rows (½, ½).
    student, teacher = embeddings_only([[1, 0], [0, 1]]), embeddings_only([[1, 0], [1, 0]])
    expected = (2 * 0.5 * math.log(0.5 / (2 / 3)) + 2 * 0.5 * math.log(0.5 / (1 / 3))) / 4
    assert value(PKTLoss(), student, teacher) == pytest.approx(expected, abs=1e-6)


def _smooth_l1(a: float, b: float) -> float:
    x = abs(a - b)
    return 0.5 * x * x if x < 1 else x - 0.5


def test_rkd_distance_and_angle_terms_by_explicit_loops() -> None:
    s_points, t_points = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)], [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0)]

    def distances(points: list[tuple[float, float]]) -> list[list[float]]:
        d = [[math.dist(p, q) for q in points] for p in points]
        mean = sum(map(sum, d)) / 6  # the 6 ordered pairs i ≠ j
        return [[x / mean for x in row] for row in d]

    def unit(p: tuple[float, float], q: tuple[float, float]) -> tuple[float, float]:
        v = (q[0] - p[0], q[1] - p[1])
        n = math.hypot(*v)
        return (v[0] / n, v[1] / n) if n else (0.0, 0.0)

    def angles(points: list[tuple[float, float]]) -> list[float]:
        return [
            sum(a * b for a, b in zip(unit(points[i], points[j]), unit(points[i], points[k]), strict=True))
            for i in range(3)
            for j in range(3)
            for k in range(3)
        ]

    ds, dt = distances(s_points), distances(t_points)
    distance = sum(_smooth_l1(ds[i][j], dt[i][j]) for i in range(3) for j in range(3)) / 9
    angle = sum(_smooth_l1(a, b) for a, b in zip(angles(s_points), angles(t_points), strict=True)) / 27
    expected = 25 * distance + 50 * angle
    got = value(RKDLoss(), embeddings_only(s_points), embeddings_only(t_points))
    assert got == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_crd_first_call_with_two_images_and_one_negative() -> None:
    # Unit embeddings e₀, e₁ on both sides; τ = 1. The memories start as the embeddings themselves.
    # Scores exp(v · M_j): positive e, negative 1; Z = 2 · mean(e, 1, e, 1) = e + 1; noise K/n = ½.
    # Each sample and side: −log(h₊ / (h₊ + ½)) − log(½ / (h₋ + ½)), h₊ = e/(e + 1), h₋ = 1/(e + 1).
    shapes = FeatureShapes(embed_dim=2, tokens=((1, 1),), num_images=2)
    loss = CRDLoss(shapes, temperature=1.0)
    features = embeddings_only([[1, 0], [0, 1]])
    features.index = torch.tensor([0, 1])
    h_pos, h_neg = math.e / (math.e + 1), 1 / (math.e + 1)
    per_side = -math.log(h_pos / (h_pos + 0.5)) - math.log(0.5 / (h_neg + 0.5))
    assert value(loss, features, features) == pytest.approx(2 * per_side, rel=1e-5)


def test_crd_memory_moves_halfway_to_the_new_embedding() -> None:
    shapes = FeatureShapes(embed_dim=2, tokens=((1, 1),), num_images=2)
    loss = CRDLoss(shapes)
    first = embeddings_only([[1, 0], [0, 1]])
    first.index = torch.tensor([0, 1])
    loss(first, first)
    moved, same = embeddings_only([[0, 1]]), embeddings_only([[1, 0]])
    moved.index = torch.tensor([0])
    loss(moved, same)
    expected = torch.tensor([1.0, 1.0]) / SQRT2  # normalise(½ · (1, 0) + ½ · (0, 1))
    torch.testing.assert_close(loss.memory_student[0], expected)
    torch.testing.assert_close(loss.memory_teacher[0], torch.tensor([1.0, 0.0]))
