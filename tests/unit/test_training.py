"""Training pieces on toy data: center loss, cleaning, calibration of the decision thresholds."""

import logging

import numpy as np
import pytest
import torch

from shared.local_index import LocalIndex
from shared.index import CentroidRows, ReferenceRows
from shared.model import LandmarkNet
from shared.training import calibrate as cal
from shared.training.cleaning import clean, mean_reference_similarity, reference_threshold
from shared.training.losses import CenterLoss
from shared.training.train import TrainConfig, make_optimizer, train_one_epoch


def test_center_loss_ignores_the_non_landmark_class():
    loss = CenterLoss(n_landmarks=3, dim=4)
    far = torch.full((5, 4), 100.0)
    assert loss(far, torch.full((5,), 3)).item() == 0.0  # label 3 = non-landmark
    assert loss(far, torch.zeros(5, dtype=torch.long)).item() > 1000


def test_a_few_epochs_learn_a_separable_toy_task():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    labels = rng.integers(0, 3, 96)
    images = np.broadcast_to(colours[labels][:, None, None, :], (96, 32, 32, 3)).copy()
    cfg = TrainConfig(backbone="tiny", embedding_dim=16, input_size=32, batch_size=32)
    net, centers = LandmarkNet("tiny", 16, 2), CenterLoss(2, 16)  # class 2 = non-landmark
    optimizer = make_optimizer(net, centers, cfg)
    gen = torch.Generator().manual_seed(0)
    first = train_one_epoch(net, centers, optimizer, images, labels, cfg, gen, (0.5,) * 3, (0.25,) * 3)
    for _ in range(6):
        last = train_one_epoch(net, centers, optimizer, images, labels, cfg, gen, (0.5,) * 3, (0.25,) * 3)
    assert last.loss < first.loss and last.accuracy > 0.9


def test_cleaning_drops_photos_far_from_their_references_and_scores_itself():
    rng = np.random.default_rng(1)
    axes = np.eye(8, dtype=np.float32)
    refs = {1: axes[[0]] + rng.normal(0, 0.05, (3, 8)).astype(np.float32),
            2: axes[[1]] + rng.normal(0, 0.05, (3, 8)).astype(np.float32)}
    refs = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in refs.items()}
    good = axes[[0] * 20] + rng.normal(0, 0.05, (20, 8))
    dirty = axes[[2] * 5] + rng.normal(0, 0.05, (5, 8))  # labelled 1, really something else
    photos = np.vstack([good, dirty]).astype(np.float32)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    sims = mean_reference_similarity(photos, np.ones(25, int), refs)
    keep, report = clean(sims, reference_threshold(refs), np.r_[np.zeros(20), np.ones(5)])
    assert report.dropped == 5 and report.precision == 1.0 and report.recall == 1.0
    assert keep[:20].all()


def test_cleaning_figures_equal_their_pair_by_pair_definitions():
    """Each photo against its own landmark's references; each reference against its own landmark's others
    (genuine) and every other landmark's references (impostor): the quantiles of a direct computation."""
    rng = np.random.default_rng(4)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    refs = {i: unit(rng.normal(size=(int(rng.integers(1, 6)), 12))) for i in range(1, 9)}
    labels = rng.integers(1, 11, 60)  # 9 and 10 have no references
    photos = unit(rng.normal(size=(60, 12)))
    sims = mean_reference_similarity(photos, labels, refs)
    for photo, label, sim in zip(photos, labels, sims):
        if label in refs:
            assert sim == pytest.approx(float((refs[label] @ photo).mean()), abs=1e-5)
        else:
            assert np.isnan(sim)
    ids = [i for i, r in refs.items() if len(r) >= 2]
    genuine, impostor = [], []
    for i in ids:
        for k, ref in enumerate(refs[i]):
            genuine.append(np.mean([ref @ other for j, other in enumerate(refs[i]) if j != k]))
            impostor.append(np.mean([ref @ other for j in ids if j != i for other in refs[j]]))
    for margin in (0.0, 0.5, 1.0):
        low, high = np.quantile(genuine, 0.05), np.quantile(impostor, 0.95)
        assert reference_threshold(refs, margin) == pytest.approx(float(high + margin * (low - high)), abs=1e-5)


def test_calibration_meets_the_non_landmark_target_on_its_own_split():
    rng = np.random.default_rng(2)
    dim, n_landmarks = 16, 6
    centres = rng.normal(size=(n_landmarks, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    index = LocalIndex("v", CentroidRows(np.arange(1, 7), np.zeros(6), np.zeros(6), np.arange(6) * 0.1, centres),
                       ReferenceRows(np.arange(1, 7), np.zeros(6), centres))
    truth = list(rng.integers(1, 7, 200)) + [None] * 800
    photos = np.array([centres[t - 1] + rng.normal(0, 0.15, dim) if t else rng.normal(0, 1, dim) for t in truth],
                      np.float32)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    candidates = cal.global_candidates(index, "v", photos, 5)
    t_global, t_ref, curve = cal.calibrate_no_gps(candidates, truth, 0.99)
    answers = [cal.decide_no_gps(candidates, i, t_global, t_ref) for i in range(len(truth))]
    non_landmark = np.mean([a is None for a, t in zip(answers, truth) if t is None])
    landmark = np.mean([a == t for a, t in zip(answers, truth) if t is not None])
    assert non_landmark >= 0.99
    assert landmark > 0.5  # well-separated toy landmarks stay recognisable at that threshold
    assert len(curve) > 10


def test_geo_threshold_counts_every_gps_negative_including_those_far_from_landmarks():
    # 70 negatives far from any landmark (None), 30 near one (3 of them scoring high), 50 landmark photos.
    negatives = [None] * 70 + [(1, 0.1)] * 27 + [(1, 0.5), (1, 0.6), (1, 0.7)]
    positives = [(1, 0.6)] * 50
    t_geo, curve = cal.calibrate_geo(negatives + positives, [None] * 100 + [1] * 50, 0.99, np.zeros(100))
    accepted = sum(b is not None and b[1] >= t_geo for b in negatives)
    assert accepted == 1  # 99 % of all 100 GPS negatives rejected (of the 30 near ones alone, none would pass)
    assert 0.6 < t_geo <= 0.7
    assert curve[0][1] == 1.0 and curve[-1][1] == 0.0  # lowest threshold takes every landmark photo


def test_everyday_photos_taken_beside_a_landmark_are_mostly_kept_out_however_few_of_the_split_they_are():
    """The target alone lets 1 % of all GPS negatives through: with 40 in-square ones among 1,000, a quarter of
    the photos taken beside a landmark would be tagged with it; at most a tenth are."""
    near = [(1, k / 40) for k in range(40)]  # in-square scores 0.0 .. 0.975
    best, truth = [None] * 960 + near, [None] * 1000
    t_geo, _ = cal.calibrate_geo(best, truth, 0.99, np.zeros(1000))
    passed = sum(score >= t_geo for _, score in near)
    assert passed == 4  # a tenth of 40; the target alone allowed 10


def test_a_split_with_hardly_any_everyday_photo_near_a_landmark_keeps_a_visual_check(caplog):
    """5 in-square negatives among 1,000: the target alone set t_geo to -1.0, tagging a photo of anything
    taken within 500 m of a landmark. The floor comes from every negative's best global score instead."""
    best = [None] * 995 + [(1, s) for s in (0.2, 0.3, 0.4, 0.5, 0.6)] + [(1, 0.9)] * 40
    truth = [None] * 1000 + [1] * 40
    global_best = np.linspace(0.0, 0.8, 1000)
    with caplog.at_level(logging.WARNING, logger="shared.training.calibrate"):
        t_geo, _ = cal.calibrate_geo(best, truth, 0.995, global_best)
    assert t_geo == cal.threshold_for_accuracy(global_best, 0.9)  # about 0.72: the food photo (score 0) stays out
    assert 0.6 < t_geo < 0.9  # the landmark photos (0.9) are still tagged
    assert any("only 5 non-landmark photos" in r.getMessage() for r in caplog.records)


def test_a_split_without_gps_negatives_sets_t_geo_from_the_others_and_says_so(caplog):
    """Nothing to calibrate t_geo on: it was 1.0, and photos with GPS went untagged while the same photo without
    GPS was tagged; now the floor from the photos without GPS, and an ML engineer hears why."""
    global_best = np.linspace(0.0, 0.8, 100)
    with caplog.at_level(logging.WARNING, logger="shared.training.calibrate"):
        t_geo, _ = cal.calibrate_geo([(1, 0.9)] * 20, [1] * 20, 0.99, global_best)
    assert t_geo == cal.threshold_for_accuracy(global_best, 0.9)
    assert any("no non-landmark photos with GPS" in r.getMessage() for r in caplog.records)


def test_augmentation_is_batched_deterministic_and_keeps_pixels_in_range():
    from shared.training.augment import augment
    batch = torch.rand(8, 3, 40, 40)
    a = augment(batch, 32, torch.Generator().manual_seed(3))
    b = augment(batch, 32, torch.Generator().manual_seed(3))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a[0], augment(batch, 32, torch.Generator().manual_seed(4))[0])
