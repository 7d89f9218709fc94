"""`landmarks build`: dataset → cleaning with reference photos → curriculum training over the 4 regions
(softmax + center loss) → centroids (complete-link clustering) → thresholds calibrated on the
validation split → a model file carrying its gallery, thresholds and metrics. Each stage leaves a
checkpoint in `<MODEL>.work/`, so an interrupted build resumes where it stopped; a checkpoint made from
another dataset, config or init weights is trained afresh instead."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from shared.cpus import usable_cpus
from shared.errors import DecodeError
from shared.events import GeoPoint
from shared.gallery import LandmarkPhotos, build_gallery
from shared.imaging import decode_image, one_thread_per_decode
from shared.local_index import LocalIndex, grouped_by_id
from shared.model import LandmarkNet, ModelMeta, save_checkpoint
from shared.publish import gallery_rows
from shared.recognition import Thresholds
from shared.training import calibrate as cal
from shared.training.cleaning import clean, mean_reference_similarity, reference_threshold
from shared.training.dataset import Dataset, frequent_landmarks, is_frequent, load_dataset
from shared.training.losses import CenterLoss
from shared.training.train import TrainConfig, cosine_schedule, embed_images, make_optimizer, train_one_epoch

log = logging.getLogger(__name__)
STORE_SIZE = 112  # training photos are kept decoded at least at this size; random crops are resized to the input
# --init weights that fill less of the backbone than this are for another network, not a partial fit.
MIN_INIT_SHARE = 0.1


@dataclass
class BuildConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    clean: bool = True
    curriculum: bool = True
    clean_margin: float = 0.5
    non_landmark_ratio: float = 0.5   # non-landmark photos per landmark photo in each stage
    min_cluster: int = 20
    cluster_distance: float = 0.5
    # 99 % non-landmark accuracy is the goal; calibrating for 99.5 % on the validation split leaves a
    # margin for its sampling error (3,000 negatives estimate a 1 % tail to about ±0.2 %).
    target_accuracy: float = 0.995
    global_k: int = 10


PRESETS = {
    "tiny": BuildConfig(train=TrainConfig(backbone="tiny", embedding_dim=64, input_size=64, batch_size=64,
                                          epochs_per_stage=(1, 1, 1, 1)), min_cluster=5),
    "small": BuildConfig(train=TrainConfig(backbone="resnet_small", embedding_dim=128, input_size=96,
                                           batch_size=64, epochs_per_stage=(10, 8, 8, 10)), min_cluster=20),
    "medium": BuildConfig(train=TrainConfig(backbone="wide_resnet50_2", embedding_dim=512, input_size=224,
                                            batch_size=128, epochs_per_stage=(3, 3, 3, 3)), min_cluster=30),
}


# Used only after the stages (gallery, calibration), which every run redoes: changing them keeps the
# stage checkpoints.
POST_TRAINING_FIELDS = ("min_cluster", "cluster_distance", "target_accuracy", "global_k")
# The files the stages read; val.csv and test.csv only reach calibration and evaluation.
TRAINING_FILES = ("landmarks.csv", "train.csv", "references.csv")


def store_size(cfg: BuildConfig) -> int:
    """Never below the network's input: photos stored smaller would be upsampled for training and the
    gallery, while validation, test and live photos are decoded at the input size."""
    return max(STORE_SIZE, cfg.train.input_size)


def check_buildable(ds: Dataset, cfg: BuildConfig) -> None:
    """What a build needs beyond a valid dataset, checked before any training: ValueError naming it."""
    problems = []
    if not any(p.landmark_id is not None for p in ds.train):
        problems.append("train.csv has no landmark photos (rows with a landmark_id)")
    if not any(p.landmark_id is None for p in ds.val):
        found = "has none" if (ds.root / "val.csv").exists() else "is missing"
        problems.append(f"val.csv with non-landmark photos (empty landmark_id) is needed to calibrate the "
                        f"thresholds for {cfg.target_accuracy:.1%} non-landmark accuracy; it {found}")
    if cfg.clean:
        per_landmark = Counter(p.landmark_id for p in ds.references)
        if sum(n >= 2 for n in per_landmark.values()) < 2:
            problems.append("cleaning needs two or more landmarks with at least two reference photos each "
                            "(references.csv); add references or build without cleaning (--ablation no_cleaning)")
    if problems:
        raise ValueError(f"{ds.root}: cannot build: " + "; ".join(problems))


def fingerprint(ds: Dataset, cfg: BuildConfig, init: Path | None) -> dict[str, str]:
    """What the stages are trained from, one digest per part so a mismatch can say which changed."""
    files = hashlib.sha256()
    for name in TRAINING_FILES:
        files.update(name.encode() + b"\0" + (ds.root / name).read_bytes())
    # A photo replaced under the same name changes no csv, so each photo's size and mtime count too:
    # a stat per file where hashing every photo's bytes would read the whole dataset at each start.
    for photo in ds.train + ds.references:
        files.update(_file_identity(photo.path))
    training = {k: v for k, v in asdict(cfg).items() if k not in POST_TRAINING_FIELDS}
    training["store_size"] = store_size(cfg)
    config = hashlib.sha256(json.dumps(_jsonable(training), sort_keys=True).encode())
    weights = "none"
    if init is not None:
        with init.open("rb") as handle:
            weights = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"dataset": files.hexdigest(), "config": config.hexdigest(), "init": weights}


def _file_identity(path: Path) -> bytes:
    try:
        stat = path.stat()
    except OSError:
        return b"missing\0"  # the csv rows (hashed above) say which photo this is, in order
    return f"{stat.st_size}\0{stat.st_mtime_ns}\0".encode()


@dataclass
class Images:
    pixels: np.ndarray
    gps: list[GeoPoint | None]
    ok: np.ndarray  # which paths decoded


def load_images(paths: list[Path], size: int, progress=None, *, split: str = "dataset",
                threads: int | None = None) -> Images:
    """The photos decoded at ``size``, ``threads`` at a time (default: one per CPU this process may use;
    Pillow and libheif decode without holding the GIL), each on one thread: libheif would split a HEIC's
    tiles over four threads of its own, which only take turns with the other decodes on the cores (as in
    the worker's decode pool, shared/loading.py). Photos are taken one at a time as threads come free, so a
    run of costly HEICs does not hold up the rest."""
    def one(path: Path):
        try:
            decoded = decode_image(path.read_bytes(), size=size, max_pixels=50_000_000)
            return decoded.pixels, decoded.gps
        except (DecodeError, OSError) as exc:
            log.warning("unreadable %s photo %s: %s", split, path, exc)
            return None
    one_thread_per_decode()  # for the process, as the worker's thread pool sets it
    with ThreadPoolExecutor(max_workers=threads or usable_cpus(), thread_name_prefix="decode") as pool:
        results = []
        for result in pool.map(one, paths):
            results.append(result)
            if progress:
                progress(1)
    ok = np.array([r is not None for r in results], dtype=bool)
    pixels = np.stack([r[0] for r in results if r is not None]) if ok.any() else np.zeros((0, size, size, 3), np.uint8)
    gps = [r[1] if r is not None and r[1] is not None and not r[1].is_null_island else None for r in results]
    return Images(pixels, [g for g, k in zip(gps, ok) if k], ok)


class Builder:
    def __init__(self, world: Path, out: Path, cfg: BuildConfig, *, init: Path | None = None,
                 progress=None, version: str | None = None) -> None:
        self.world, self.out, self.cfg, self.progress = world, out, cfg, progress
        self.ds: Dataset = load_dataset(world)
        check_buildable(self.ds, cfg)  # before the work folder and hours of training
        self.fingerprint = fingerprint(self.ds, cfg, init)
        self.work = out.with_name(out.name + ".work")
        self.work.mkdir(parents=True, exist_ok=True)
        self.landmarks = sorted(self.ds.landmarks.values(), key=lambda lm: lm.id)
        self.class_of = {lm.id: k for k, lm in enumerate(self.landmarks)}
        self.n = len(self.landmarks)
        self.version = version or re.sub(r"[^A-Za-z0-9_]", "_", f"{out.stem}_{int(time.time())}")
        torch.manual_seed(cfg.train.seed)
        self.net = LandmarkNet(cfg.train.backbone, cfg.train.embedding_dim, self.n).to(memory_format=torch.channels_last)
        if init is not None:
            self._load_init(init)
        self.centers = CenterLoss(self.n, cfg.train.embedding_dim)
        self.meta = ModelMeta(version=self.version, backbone=cfg.train.backbone,
                              embedding_dim=cfg.train.embedding_dim, n_landmarks=self.n,
                              input_size=cfg.train.input_size)
        self.report: dict = {"stages": [], "config": _jsonable(asdict(cfg))}
        self.trained = False   # whether a stage has trained the network yet (cleaning needs one)
        self.unclean: list[int] = []  # regions that joined and wait for a trained network to clean them
        self.retrained = False  # a stage ran in this build, so later checkpoints start from other weights

    def _load_init(self, path: Path) -> None:
        """Local pretrained weights (torchvision ImageNet or a Places365 WRN-50-2 state dict)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        trunk_keys = dict(self.net.trunk.state_dict())
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        mapped = {}
        for key, value in state.items():
            head = key.split(".")[0]
            if head in names:
                new = f"{names.index(head)}.{key[len(head) + 1:]}"
                if new in trunk_keys and trunk_keys[new].shape == value.shape:
                    mapped[new] = value
        missing = set(trunk_keys) - set(mapped)
        if len(mapped) < MIN_INIT_SHARE * len(trunk_keys):
            raise ValueError(f"{path}: only {len(mapped)} of the {len(trunk_keys)} tensors of backbone "
                             f"{self.cfg.train.backbone!r} match these weights (names and shapes): not weights "
                             "for this backbone (a torchvision ResNet or Places365 WRN-50-2 state dict)")
        self.net.trunk.load_state_dict({**trunk_keys, **mapped})
        if missing:
            log.warning("initialised backbone from %s: %d of %d tensors left as initialised (no weight of that "
                        "name and shape)", path, len(missing), len(trunk_keys))
        else:
            log.info("initialised backbone from %s (%d tensors)", path, len(mapped))

    # --- data ---------------------------------------------------------------------------------

    def _track(self, description: str, total: int):
        if self.progress is None:
            return lambda n: None
        task = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(task, n)

    def load_training_data(self) -> None:
        self.load_references()  # first: a landmark without a readable one fails before the long decoding
        train = self.ds.train
        paths = [p.path for p in train]
        images = load_images(paths, store_size(self.cfg), self._track("decoding training photos", len(paths)),
                             split="training")
        kept = [p for p, ok in zip(train, images.ok) if ok]
        self.train_pixels = images.pixels
        self.train_labels = np.array([self.class_of[p.landmark_id] if p.landmark_id is not None else self.n
                                      for p in kept], dtype=np.int64)
        region = {lm.id: lm.region for lm in self.landmarks}
        self.train_regions = np.array([region[p.landmark_id] if p.landmark_id is not None else 0 for p in kept])
        truth = [p.extra.get("true_landmark_id") for p in kept]
        self.train_dirty = np.array([p.landmark_id is not None and str(t or "") != str(p.landmark_id)
                                     for p, t in zip(kept, truth)]) if any("true_landmark_id" in p.extra for p in kept) else None
        self.keep = np.ones(len(kept), dtype=bool)

    def load_references(self) -> None:
        """Decoded reference photos; ValueError naming the landmarks left without a readable one: published
        without one, a landmark could never be tagged on a photo without GPS."""
        refs = self.ds.references
        ref_images = load_images([r.path for r in refs], store_size(self.cfg), split="reference")
        self.ref_pixels = ref_images.pixels
        self.ref_ids = np.array([r.landmark_id for r, ok in zip(refs, ref_images.ok) if ok])
        readable = set(self.ref_ids.tolist())
        unreadable = [lm for lm in self.landmarks if lm.id not in readable]
        if unreadable:
            raise ValueError(f"{self.ds.root / 'references.csv'}: {len(unreadable)} landmark(s) have no readable "
                             f"reference photo: {_some(unreadable)}; every landmark needs one, or photos without "
                             "GPS can never be tagged with it (see the warnings above for each photo)")

    # --- cleaning and curriculum ----------------------------------------------------------------

    def _references(self) -> dict[int, np.ndarray]:
        emb = embed_images(self.net, self.ref_pixels, self.cfg.train.input_size, self.meta.mean, self.meta.std)
        return {int(i): emb[self.ref_ids == i] for i in np.unique(self.ref_ids)}

    def clean_regions(self, regions: list[int]) -> dict:
        """Drop the regions' photos that are far from their landmark's references (current network)."""
        rows = np.flatnonzero(np.isin(self.train_regions, regions))
        references = self._references()
        emb = embed_images(self.net, self.train_pixels[rows], self.cfg.train.input_size, self.meta.mean, self.meta.std)
        ids = np.array([self.landmarks[c].id for c in self.train_labels[rows]])
        sims = mean_reference_similarity(emb, ids, references)
        threshold = reference_threshold(references, self.cfg.clean_margin)
        truth = self.train_dirty[rows] if self.train_dirty is not None else None
        keep, report = clean(sims, threshold, truth)
        self.keep[rows] = keep
        log.info("cleaning regions %s: dropped %d of %d (precision %s, recall %s)", regions, report.dropped,
                 len(rows), report.precision, report.recall)
        return {"regions": regions, **asdict(report)}

    def _stage_regions(self, stage: int) -> list[int]:
        return list(range(1, stage + 1)) if self.cfg.curriculum else [1, 2, 3, 4]

    def _landmark_rows(self, stage: int) -> np.ndarray:
        return np.flatnonzero(np.isin(self.train_regions, self._stage_regions(stage)) & self.keep)

    def stage_rows(self, stage: int, generator: np.random.Generator) -> np.ndarray:
        landmark_rows = self._landmark_rows(stage)
        others = np.flatnonzero(self.train_labels == self.n)
        take = min(len(others), int(len(landmark_rows) * self.cfg.non_landmark_ratio))
        return np.concatenate([landmark_rows, generator.choice(others, take, replace=False)])

    def _joining(self, stage: int) -> list[int]:
        """The regions whose photos a stage adds."""
        if not self.cfg.curriculum:
            return [1, 2, 3, 4] if stage == 1 else []
        return [stage]

    def _clean_waiting(self) -> list[dict]:
        """Each region is cleaned with the network of the stage before the one it is trained in; regions
        that joined before any stage trained (region 1, or empty stages first) wait for the first trained
        network: an untrained one would drop photos at random."""
        if not (self.cfg.clean and self.trained and self.unclean):
            return []
        waiting, self.unclean = self._with_photos(self.unclean), []
        return [self.clean_regions(waiting)] if waiting else []

    def _with_photos(self, regions: list[int]) -> list[int]:
        return [r for r in regions if (self.train_regions == r).any()]

    def _resume(self, stage: int) -> bool:
        ckpt = self.work / f"stage{stage}.pt"
        if not ckpt.exists():
            return False
        if self.retrained:
            log.warning("stage %d: not resuming from %s: an earlier stage was trained afresh", stage, ckpt)
            return False
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as exc:  # what truncated or bad bytes raise
            log.warning("stage %d: not resuming from %s: it cannot be read (%s); training it afresh", stage, ckpt, exc)
            return False
        why = self._why_not_resume(state.get("fingerprint"))
        if why:
            log.warning("stage %d: not resuming from %s: %s; training it afresh", stage, ckpt, why)
            return False
        self.net.load_state_dict(state["net"])
        self.centers.load_state_dict(state["centers"])
        self.keep = state["keep"].numpy().astype(bool)
        self.trained, self.unclean = bool(state["trained"]), [int(r) for r in state["unclean"]]
        self.report["stages"].append(state["report"])
        log.info("stage %d: resumed from %s", stage, ckpt)
        return True

    def _why_not_resume(self, recorded: dict | None) -> str:
        if recorded is None:
            return "it does not record what it was trained from (an older build)"
        changed = [part for part, digest in self.fingerprint.items() if recorded.get(part) != digest]
        names = {"dataset": "dataset (landmarks, train or references csv, or their photo files)",
                 "config": "training config", "init": "init weights"}
        return f"what it was trained from has changed: {', '.join(names[c] for c in changed)}" if changed else ""

    def run_stage(self, stage: int) -> None:
        self.unclean += self._joining(stage)
        if self._resume(stage):
            return
        self.retrained = True
        cleaning = self._clean_waiting()
        if len(self._landmark_rows(stage)) == 0:
            log.warning("stage %d: skipped: no landmark photos in regions %s", stage, self._stage_regions(stage))
            report = {"stage": stage, "regions": [], "photos": 0, "epochs": [], "cleaning": cleaning,
                      "skipped": "no landmark photos"}
        else:
            report = self._train_stage(stage, cleaning)
            self.trained = True
        self.report["stages"].append(report)
        ckpt = self.work / f"stage{stage}.pt"
        tmp = ckpt.with_suffix(".pt.tmp")
        torch.save({"net": self.net.state_dict(), "centers": self.centers.state_dict(),
                    "keep": torch.from_numpy(self.keep), "report": _jsonable(report), "trained": self.trained,
                    "unclean": list(self.unclean), "fingerprint": self.fingerprint}, tmp)
        tmp.replace(ckpt)  # a build killed while saving leaves the previous file or none, never half of one

    def _train_stage(self, stage: int, cleaning: list[dict]) -> dict:
        cfg = self.cfg.train
        rng = np.random.default_rng(cfg.seed + stage)
        rows = self.stage_rows(stage, rng)
        optimizer = make_optimizer(self.net, self.centers, cfg)
        generator = torch.Generator().manual_seed(cfg.seed * 100 + stage)
        epochs = cfg.epochs_per_stage[stage - 1]
        tick = self._track(f"stage {stage}/4: regions 1..{stage if self.cfg.curriculum else 4}", epochs * len(rows))
        stats = []
        for epoch in range(epochs):
            schedule = cosine_schedule()
            progress_offset = epoch / epochs
            stats.append(asdict(train_one_epoch(
                self.net, self.centers, optimizer, self.train_pixels[rows], self.train_labels[rows], cfg,
                generator, self.meta.mean, self.meta.std,
                lr_schedule=lambda p, o=progress_offset: schedule(o + p / epochs), on_step=tick)))
            log.info("stage %d epoch %d: %s", stage, epoch + 1, stats[-1])
        regions = sorted(int(r) for r in np.unique(self.train_regions[rows]) if r > 0)
        return {"stage": stage, "regions": regions, "photos": int(len(rows)), "epochs": stats, "cleaning": cleaning}

    def run_stages(self) -> None:
        for stage in (1, 2, 3, 4):
            self.run_stage(stage)
        if not self.trained:
            raise ValueError(f"{self.ds.root}: no stage had landmark photos to train on (all unreadable?)")
        uncleaned = self._with_photos(self.unclean)
        if self.cfg.clean and uncleaned:
            log.warning("regions %s were not cleaned: no trained stage came after them", uncleaned)
            self.report["uncleaned_regions"] = uncleaned

    # --- gallery and calibration --------------------------------------------------------------

    def embed_paths(self, paths: list[Path], description: str,
                    split: str) -> tuple[np.ndarray, list[GeoPoint | None], np.ndarray]:
        """Photos decoded exactly as the workers decode them, then embedded."""
        images = load_images(paths, self.cfg.train.input_size, self._track(description, len(paths)), split=split)
        emb = embed_images(self.net, images.pixels, self.cfg.train.input_size, self.meta.mean, self.meta.std)
        return emb, images.gps, images.ok

    def gallery(self) -> dict:
        emb = embed_images(self.net, self.train_pixels, self.cfg.train.input_size, self.meta.mean, self.meta.std)
        references = self._references()
        kept = np.flatnonzero(self.keep)
        kept_rows = grouped_by_id(self.train_labels[kept], kept)  # one sort, not a mask per landmark
        no_photos = np.zeros(0, np.int64)
        items, reference_only = [], []
        for k, lm in enumerate(self.landmarks):
            photos = emb[kept_rows.get(k, no_photos)]
            refs = references[lm.id]  # every landmark has one (load_references)
            if len(photos) == 0:
                photos = refs
                reference_only.append(lm)
            items.append(LandmarkPhotos(lm, refs, photos))
        if reference_only:
            log.warning("%d landmark(s) have no training photo left (none readable, or all dropped by cleaning): "
                        "their centroids are their reference photos only: %s", len(reference_only),
                        _some(reference_only))
        gallery = build_gallery(items, min_cluster=self.cfg.min_cluster, max_distance=self.cfg.cluster_distance)
        # Kept for the report's ablation: the same landmarks with one centroid over all their photos.
        gallery["one_centroid"] = {
            "landmark_ids": torch.tensor([it.info.id for it in items], dtype=torch.int64),
            "embeddings": torch.from_numpy(np.stack([_unit(it.photos.mean(axis=0)) for it in items]))}
        counts = np.bincount(gallery["centroids"]["landmark_ids"].numpy())
        counts = counts[counts > 0]
        self.report["centroids"] = {"landmarks": int(len(counts)), "centroids": int(counts.sum()),
                                    "share_with_several": float((counts > 1).mean())}
        return gallery

    def calibrate(self, gallery: dict) -> cal.Calibration:
        val = self.ds.val
        emb, gps, ok = self.embed_paths([p.path for p in val], "calibrating on the validation split", "validation")
        records = [p for p, k in zip(val, ok) if k]
        truth = [p.landmark_id for p in records]
        index = LocalIndex(self.version, *gallery_rows(gallery))
        candidates = cal.global_candidates(index, self.version, emb, self.cfg.global_k)
        t_global, t_ref, curve = cal.calibrate_no_gps(candidates, truth, self.cfg.target_accuracy)
        with_gps = [i for i, g in enumerate(gps) if g is not None]
        best = cal.geo_scores(index, self.version, emb[with_gps], [gps[i] for i in with_gps]) if with_gps else []
        t_geo, geo_curve = cal.calibrate_geo(best, [truth[i] for i in with_gps], self.cfg.target_accuracy,
                                             cal.best_global_scores(candidates, truth))
        metrics = self._validation_metrics(index, emb, gps, records, Thresholds(t_geo, t_global, t_ref))
        return cal.Calibration(t_geo, t_global, t_ref, {"no_gps": curve, "geo": geo_curve},
                               {"photos": len(truth), "with_gps": len(with_gps)}, metrics)

    def _validation_metrics(self, index, emb: np.ndarray, gps: list, records: list, thresholds: Thresholds) -> dict:
        """`landmarks eval`'s figures on the validation split at the chosen thresholds, through the workers'
        decision rule (optimistic: the thresholds were chosen on these photos)."""
        from shared.training.evaluate import TestPhotos, accuracy_metrics, decide  # evaluate imports this module
        frequent = frequent_landmarks(self.ds)
        photos = TestPhotos(emb, gps, [r.landmark_id for r in records], [is_frequent(r, frequent) for r in records])
        return accuracy_metrics(photos, decide(photos, index, self.version, thresholds, self.cfg.global_k))

    def run(self) -> ModelMeta:
        started = time.monotonic()
        self.load_training_data()
        self.run_stages()
        gallery = self.gallery()
        calibration = self.calibrate(gallery)
        self.meta = replace(self.meta, t_geo=calibration.t_geo, t_global=calibration.t_global, t_ref=calibration.t_ref)
        self.report["calibration"] = {"t_geo": calibration.t_geo, "t_global": calibration.t_global,
                                      "t_ref": calibration.t_ref, **calibration.val}
        self.report["validation"] = calibration.metrics
        self.report["curves"] = calibration.curves
        self.report["seconds"] = round(time.monotonic() - started, 1)
        self.meta.extra = {"build": _jsonable(self.report), "world": str(self.world),
                           "class_landmark_ids": [lm.id for lm in self.landmarks],
                           "metrics": self._published_metrics()}
        save_checkpoint(self.out, self.net, self.meta, gallery)
        return self.meta

    def _published_metrics(self) -> dict:
        """What `landmarks publish` records with the version (model_versions.metrics)."""
        return _jsonable({"validation": self.report["validation"], "calibration": self.report["calibration"],
                          "target_accuracy": self.cfg.target_accuracy, "centroids": self.report["centroids"]})


def _some(landmarks: list, shown: int = 10) -> str:
    """`3 (lm3), 7 (lm7) and 12 more`: the first landmarks of a list, for one line of a message."""
    names = ", ".join(f"{lm.id} ({lm.slug})" for lm in landmarks[:shown])
    return names + (f" and {len(landmarks) - shown} more" if len(landmarks) > shown else "")


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
