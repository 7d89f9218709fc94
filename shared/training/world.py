"""A deterministic synthetic landmark world, hard in the article's ways (see docs/dataset.md).

`generate_world(out, seed=..., preset="tiny"|"small"|"medium")` plans the whole world in the parent
process from one random stream (landmarks, cities, which photo shows what, labels, GPS), then renders the
photos in a multiprocessing Pool; each photo's pixels come from its own stream seeded by
(seed, photo index), so the output does not depend on the number of workers.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin

from shared.cpus import usable_cpus
from shared.training import world_render as R
from shared.training import world_scenes as S
from shared.training.world_places import (ANTIMERIDIAN_CITY, CITIES, DENSE_CITY, destination,
                                          haversine_m)

VERSION = "world-1"
DIRTY_RATE = 0.14
HARD_NEGATIVE_RATE = 0.2
GPS_RATE = 0.5
FREQUENT_TEST_SHARE = 0.87
HARD_KINDS = ("family_member", "palette", "beside", "natural")

PRESETS = {
    "tiny": dict(n_landmarks=12, families=[3], natural=2, two_aspect=3, rare=2, frequent=(30, 45),
                 rare_photos=(8, 12), frequent_threshold=25, train_neg=400, test=(60, 400), val=(60, 400),
                 users=2, archive=120, size=128, dense=3),
    "small": dict(n_landmarks=48, families=[3] * 6, natural=8, two_aspect=10, rare=7, frequent=(101, 125),
                  rare_photos=(10, 20), frequent_threshold=100, train_neg=3000, test=(290, 3000),
                  val=(290, 3000), users=4, archive=300, size=128, dense=4),
    "medium": dict(n_landmarks=200, families=[3, 4] * 10, natural=30, two_aspect=45, rare=30,
                   frequent=(101, 150), rare_photos=(10, 25), frequent_threshold=100, train_neg=10000,
                   test=(290, 11000), val=(290, 11000), users=8, archive=1000, size=256, dense=6),
}
_NAMES = {
    "facade": ("Palace", "Cathedral", "Town Hall", "Opera House", "Basilica", "Museum", "Abbey"),
    "tower": ("Tower", "Belfry", "Bell Tower", "Lighthouse", "Clock Tower"),
    "dome": ("Mosque", "Domed Church", "Pantheon", "Capitol", "Mausoleum"),
    "arch": ("Arch", "Gate", "Triumphal Arch", "City Gate"),
    "monument": ("Monument", "Statue", "Obelisk", "Column", "Memorial"),
    "lake": ("Lake", "Lagoon", "Reservoir"), "ridge": ("Ridge", "Peak", "Mountains", "Cliffs"),
    "waterfall": ("Falls", "Cascade", "Waterfall"),
}
_EPITHETS = ("Old", "Great", "Royal", "Saint Anne's", "North", "Golden", "Silver", "River", "Saint Mark's",
             "Imperial", "Grand", "Blue", "White", "Red", "Saint Peter's", "Victory", "Liberty", "High")


# ------------------------------------------------------------------------------------------ plan

def _plan_landmarks(rng: np.random.Generator, p: dict) -> tuple[list[dict], list[dict]]:
    """Landmark rows (with 'spec' and 'beside') and family templates."""
    items, templates = [], []
    for f, size in enumerate(p["families"]):
        template = R.building_spec(rng, R.BUILDING_KINDS[f % 4])
        templates.append(template)
        for _ in range(size):
            items.append({"spec": R.family_member(template, rng), "family": f"F{f + 1}"})
    for k in range(p["natural"]):
        items.append({"spec": R.natural_spec(rng, R.NATURAL_KINDS[k % 3]), "family": ""})
    k = 0
    while len(items) < p["n_landmarks"]:
        items.append({"spec": R.building_spec(rng, R.BUILDING_KINDS[k % 5]), "family": ""})
        k += 1
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    two = set(rng.choice(len(items), p["two_aspect"], replace=False).tolist())
    rare = set(rng.choice(len(items), p["rare"], replace=False).tolist())
    # cities: the dense city and the antimeridian city first, the rest spread over regions
    by_region = {r: [c for c in CITIES if c[2] == r and c[0] not in (DENSE_CITY, ANTIMERIDIAN_CITY)] for r in range(1, 5)}
    cycle = [by_region[r][i] for i in range(12) for r in range(1, 5) if i < len(by_region[r])]
    dense = next(c for c in CITIES if c[0] == DENSE_CITY)
    anti = next(c for c in CITIES if c[0] == ANTIMERIDIAN_CITY)
    buildings = [i for i, it in enumerate(items) if it["spec"]["kind"] in R.BUILDING_KINDS]
    assigned: dict[int, tuple] = {}
    centre = destination(dense[3], dense[4], 500, rng.uniform(0, 360))
    for i in buildings[:p["dense"]]:
        assigned[i] = (dense, destination(*centre, rng.uniform(50, 420), rng.uniform(0, 360)))
    for j, i in enumerate(buildings[p["dense"]:p["dense"] + 2]):  # one each side of the antimeridian
        assigned[i] = (anti, (round(anti[3] + rng.uniform(-0.003, 0.003), 6), [179.9965, -179.9975][j]))
    rest = [i for i in range(len(items)) if i not in assigned]
    for n, i in enumerate(rest):
        city = cycle[n % len(cycle)]
        far = items[i]["spec"]["kind"] in R.NATURAL_KINDS
        assigned[i] = (city, destination(city[3], city[4], rng.uniform(5000, 30000) if far else rng.uniform(300, 4000),
                                         rng.uniform(0, 360)))
    rows = []
    for i, it in enumerate(items):
        (city, country, region, _, _), (lat, lon) = assigned[i]
        kind = it["spec"]["kind"]
        name = f"{R._pick(rng, _EPITHETS)} {R._pick(rng, _NAMES[kind])} of {city}"
        beside = R.building_spec(rng, "facade") if kind in R.BUILDING_KINDS else None
        rows.append({"id": i + 1, "slug": f"{name.lower().replace(' ', '_').replace(chr(39), '')}_{i + 1}",
                     "name": name, "city": city, "country": country, "region": region, "lat": lat, "lon": lon,
                     "family": it["family"], "n_aspects": 2 if i in two else 1, "kind": kind,
                     "rare": i in rare, "spec": it["spec"], "beside": beside})
    return rows, templates


class _Planner:
    def __init__(self, rng: np.random.Generator, landmarks: list[dict], p: dict):
        self.rng, self.lm, self.p = rng, landmarks, p
        self.jobs: list[dict] = []
        self.by_city: dict[str, list[dict]] = {}
        for row in landmarks:
            self.by_city.setdefault(row["city"], []).append(row)
        self.buildings = [r for r in landmarks if r["kind"] in R.BUILDING_KINDS]
        self.naturals = [r for r in landmarks if r["kind"] in R.NATURAL_KINDS]
        self.families = sorted({r["family"] for r in landmarks if r["family"]})

    def add(self, path: str, what: tuple, *, gps_at: tuple | None, gps_rate: float = GPS_RATE,
            mild: bool = False, **cols) -> dict:
        rng = self.rng
        gps = None
        if gps_at is not None and rng.random() < gps_rate:
            if rng.random() < 0.03:  # a wrong fix: kilometres off
                gps = destination(*gps_at, rng.uniform(2000, 60000), rng.uniform(0, 360))
            else:  # tens to hundreds of metres
                gps = destination(*gps_at, float(np.clip(rng.lognormal(math.log(70), 0.8), 5, 500)), rng.uniform(0, 360))
        job = {"i": len(self.jobs), "path": path, "what": what, "mild": mild, "gps": gps, **cols}
        self.jobs.append(job)
        return job

    def near(self, row: dict, lo: float, hi: float) -> tuple:
        return destination(row["lat"], row["lon"], self.rng.uniform(lo, hi), self.rng.uniform(0, 360))

    def everyday_place(self, city: tuple | None = None) -> tuple:
        """Homes and streets: mostly far from any landmark, one in five within 1 km of one."""
        rng = self.rng
        if rng.random() < 0.2:
            return self.near(self.lm[int(rng.integers(len(self.lm)))], 100, 900)
        city = city or CITIES[int(rng.integers(len(CITIES)))]
        for _ in range(20):
            point = destination(city[3], city[4], rng.uniform(2000, 20000), rng.uniform(0, 360))
            if all(haversine_m(*point, r["lat"], r["lon"]) > 1500 for r in self.lm):
                return point
        return point

    def non_landmark(self, path: str, *, hard_rate: float = HARD_NEGATIVE_RATE, city=None,
                     gps_rate: float = GPS_RATE, **cols) -> dict:
        rng = self.rng
        if rng.random() < hard_rate:
            kinds = [k for k in HARD_KINDS if (k != "family_member" or self.families) and (k != "natural" or self.naturals)]
            hard = R._pick(rng, kinds)
            if hard == "family_member":
                fam = R._pick(rng, self.families)
                what, at = ("family_member", int(fam[1:]) - 1), self.everyday_place()
            elif hard == "beside":
                row = R._pick(rng, self.buildings)
                what, at = ("beside", row["id"]), self.near(row, 30, 250)
            elif hard == "natural":
                row = R._pick(rng, self.naturals)
                what, at = ("palette", row["id"]), self.near(row, 3000, 40000)
            else:
                row = R._pick(rng, self.buildings)
                what, at = ("palette", row["id"]), self.everyday_place()
            return self.add(path, what, gps_at=at, gps_rate=gps_rate, kind=f"hard_negative:{hard}", **cols)
        sub = R._pick(rng, ("home", "home", "portrait", "portrait", "street", "street", "nature", "object"))
        return self.add(path, ("everyday", sub), gps_at=self.everyday_place(city), gps_rate=gps_rate,
                        kind="everyday", **cols)

    def landmark_photo(self, path: str, row: dict, *, mild: bool = False, aspect: int | None = None, **cols) -> dict:
        if aspect is None:
            aspect = int(self.rng.integers(row["n_aspects"]))
        return self.add(path, ("landmark", row["id"], aspect), gps_at=(row["lat"], row["lon"]), mild=mild,
                        aspect=aspect, **cols)


def _plan(seed: int, p: dict):
    rng = np.random.default_rng([seed, 0])
    landmarks, templates = _plan_landmarks(rng, p)
    P = _Planner(rng, landmarks, p)
    train, refs, val, test, archives = [], [], [], [], []
    # training photos: per landmark, a share of them dirty
    for row in landmarks:
        n = int(rng.integers(*p["rare_photos"])) if row["rare"] else int(rng.integers(*p["frequent"]))
        mates = [r for r in P.by_city[row["city"]] if r["id"] != row["id"] and r["kind"] in R.BUILDING_KINDS]
        for _ in range(n):
            path = f"train/{len(train):06d}.jpg"
            if rng.random() >= DIRTY_RATE:
                job = P.landmark_photo(path, row, true_landmark_id=row["id"], dirty_kind="")
            else:
                u = rng.random()
                if u < 0.45 and (mates or row["beside"] is not None):
                    if mates and (row["beside"] is None or rng.random() < 0.6):
                        mate = R._pick(rng, mates)
                        job = P.landmark_photo(path, mate, true_landmark_id=mate["id"], dirty_kind="neighbour")
                    else:
                        job = P.add(path, ("beside", row["id"]), gps_at=P.near(row, 30, 250),
                                    true_landmark_id="", dirty_kind="neighbour")
                elif u < 0.75:
                    job = P.add(path, ("generic",), gps_at=P.near(row, 100, 3000), true_landmark_id="", dirty_kind="generic")
                else:
                    job = P.add(path, ("everyday", R._pick(rng, S.EVERYDAY)), gps_at=P.near(row, 100, 3000),
                                true_landmark_id="", dirty_kind="non_landmark")
            job["landmark_id"] = row["id"]
            train.append(job)
    for _ in range(p["train_neg"]):
        job = P.non_landmark(f"train/{len(train):06d}.jpg", landmark_id="", true_landmark_id="", dirty_kind="")
        train.append(job)
    for row in landmarks:  # 3–5 clean references, one of the second aspect where there is one
        n = int(rng.integers(3, 6))
        for k in range(n):
            aspect = 1 if (row["n_aspects"] == 2 and k == n - 1) else 0
            refs.append(P.landmark_photo(f"references/{len(refs):05d}.jpg", row, mild=True, aspect=aspect,
                                         landmark_id=row["id"]))
    for split, rows in (("val", val), ("test", test)):
        n_lm, n_neg = p[split]
        n_freq = int(round(FREQUENT_TEST_SHARE * n_lm))
        freq = [r for r in landmarks if not r["rare"]]
        rare = [r for r in landmarks if r["rare"]]
        chosen = _spread(rng, freq, n_freq) + _spread(rng, rare, n_lm - n_freq)
        items = [("lm", r) for r in chosen] + [("neg", None)] * n_neg
        for j in rng.permutation(len(items)):
            kind, row = items[j]
            path = f"{split}/{len(rows):06d}.jpg"
            if kind == "lm":
                rows.append(P.landmark_photo(path, row, landmark_id=row["id"], kind="landmark",
                                             frequent=0 if row["rare"] else 1))
            else:
                rows.append(P.non_landmark(path, landmark_id="", frequent=""))
    for u in range(p["users"]):  # archives: 1–3 % landmark photos, from a trip or two
        home = CITIES[int(rng.integers(len(CITIES)))]
        gps_rate = 0.95 if u % 2 == 0 else 0.05
        n = p["archive"]
        n_lm = max(1, int(round(n * rng.uniform(0.01, 0.03))))
        trip_cities = {R._pick(rng, landmarks)["city"] for _ in range(2)}
        trip = [r for r in landmarks if r["city"] in trip_cities]
        is_lm = set(rng.choice(n, n_lm, replace=False).tolist())
        for k in range(n):
            path = f"archives/user{u + 1}/{k:05d}.jpg"
            if k in is_lm:
                row = R._pick(rng, trip)
                job = P.add(path, ("landmark", row["id"], int(rng.integers(row["n_aspects"]))),
                            gps_at=(row["lat"], row["lon"]), gps_rate=gps_rate, landmark_id=row["id"])
            else:
                job = P.non_landmark(path, hard_rate=0.03, city=home, gps_rate=gps_rate, landmark_id="")
            job["user_id"] = u + 1
            archives.append(job)
    return landmarks, templates, P.jobs, dict(train=train, references=refs, val=val, test=test, archives=archives)


def _spread(rng: np.random.Generator, rows: list[dict], n: int) -> list[dict]:
    """n picks from rows, every row at least once while n allows."""
    if not rows or n <= 0:
        return []
    base = [rows[i] for i in rng.permutation(len(rows))][:n]
    return base + [rows[int(i)] for i in rng.integers(0, len(rows), n - len(base))]


# ---------------------------------------------------------------------------------------- render

_STATE: dict = {}


def _init(state: dict) -> None:
    _STATE.clear()
    _STATE.update(state)


def render_job(job: dict, state: dict | None = None) -> Image.Image:
    st = state or _STATE
    size, seed = st["size"], st["seed"]
    rng = np.random.default_rng([seed, 1, job["i"]])
    C = 2 * size
    what = job["what"]
    if what[0] == "landmark":
        row = st["landmarks"][what[1]]
        scene, centre = S.landmark_scene(row["spec"], what[2], rng, C, beside=row["beside"])
    elif what[0] == "beside":
        scene, centre = S.object_scene(st["landmarks"][what[1]]["beside"], rng, C)
    elif what[0] == "family_member":
        scene, centre = S.object_scene(R.family_member(st["templates"][what[1]], rng), rng, C)
    elif what[0] == "palette":
        scene, centre = S.object_scene(R.palette_remix(st["landmarks"][what[1]]["spec"], rng), rng, C)
    elif what[0] == "generic":
        scene, centre = S.object_scene(R.generic_spec(rng), rng, C)
    else:
        scene, centre = S.everyday_scene(what[1], rng, C)
    return S.photograph(scene, centre, rng, size, mild=job["mild"])


def _rational(x: float, den: int = 1) -> TiffImagePlugin.IFDRational:
    return TiffImagePlugin.IFDRational(int(round(x * den)), den)


def gps_exif(lat: float, lon: float) -> Image.Exif:
    def dms(v: float):
        v = abs(v)
        d = int(v)
        m = int((v - d) * 60)
        s = (v - d - m / 60) * 3600
        return (_rational(d), _rational(m), _rational(s, 10000))
    exif = Image.Exif()
    exif[0x8825] = {0: b"\x02\x03\x00\x00", 1: "N" if lat >= 0 else "S", 2: dms(lat),
                    3: "E" if lon >= 0 else "W", 4: dms(lon)}
    return exif


def _render_and_save(job: dict) -> int:
    img = render_job(job)
    rng = np.random.default_rng([_STATE["seed"], 2, job["i"]])
    kwargs = {"quality": int(rng.integers(75, 96))}
    if job["gps"] is not None:
        kwargs["exif"] = gps_exif(*job["gps"])
    img.save(_STATE["out"] / job["path"], "JPEG", **kwargs)
    return job["i"]


# ----------------------------------------------------------------------------------------- write

def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def generate_world(out: Path, *, seed: int, preset: str, contact_sheet: bool = False,
                   progress: Callable[[int, int], None] | None = None, workers: int | None = None) -> dict:
    """Writes the world into `out` (see docs/dataset.md) and returns its summary counts."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    started = time.monotonic()
    p = PRESETS[preset]
    out = Path(out)
    landmarks, templates, jobs, splits = _plan(seed, p)
    for folder in {str(Path(j["path"]).parent) for j in jobs}:
        (out / folder).mkdir(parents=True, exist_ok=True)
    state = {"size": p["size"], "seed": seed, "out": out, "templates": templates,
             "landmarks": {r["id"]: {"spec": r["spec"], "beside": r["beside"]} for r in landmarks}}
    workers = workers or min(usable_cpus(), 16)  # a pod's CPU limit, not only its affinity
    total, done = len(jobs), 0
    if workers <= 1:
        _init(state)
        for job in jobs:
            _render_and_save(job)
            done += 1
            if progress and (done % 200 == 0 or done == total):
                progress(done, total)
    else:
        with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(
                workers, initializer=_init, initargs=(state,)) as pool:
            for _ in pool.imap_unordered(_render_and_save, jobs, chunksize=32):
                done += 1
                if progress and (done % 200 == 0 or done == total):
                    progress(done, total)
    _write_csv(out / "landmarks.csv", ["id", "slug", "name", "city", "country", "region", "lat", "lon",
                                       "family", "n_aspects", "kind"], landmarks)
    _write_csv(out / "train.csv", ["path", "landmark_id", "true_landmark_id", "dirty_kind", "aspect"], splits["train"])
    _write_csv(out / "references.csv", ["path", "landmark_id", "aspect"], splits["references"])
    for split in ("val", "test"):
        _write_csv(out / f"{split}.csv", ["path", "landmark_id", "kind", "frequent", "aspect"], splits[split])
    _write_csv(out / "archives.csv", ["user_id", "path", "landmark_id"], splits["archives"])
    summary = _summary(seed, preset, p, landmarks, jobs, splits)
    summary["seconds"] = round(time.monotonic() - started, 1)
    (out / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    if contact_sheet:
        from shared.training.world_sheet import write_contact_sheet
        write_contact_sheet(out, landmarks, splits)
    return summary


def _summary(seed, preset, p, landmarks, jobs, splits) -> dict:
    train = splits["train"]
    labelled = [j for j in train if j["landmark_id"] != ""]
    negatives = [j for s in ("train", "val", "test") for j in splits[s] if j["landmark_id"] == "" ]
    hard = [j for j in negatives if j.get("kind", "").startswith("hard_negative")]
    counts = {
        "landmarks": len(landmarks), "families": len({r["family"] for r in landmarks if r["family"]}),
        "two_aspect_landmarks": sum(r["n_aspects"] == 2 for r in landmarks),
        "natural_landmarks": sum(r["kind"] in R.NATURAL_KINDS for r in landmarks),
        "rare_landmarks": sum(r["rare"] for r in landmarks),
        "train_landmark_photos": len(labelled), "train_non_landmark_photos": len(train) - len(labelled),
        "references": len(splits["references"]),
        "archive_users": len({j["user_id"] for j in splits["archives"]}), "archive_photos": len(splits["archives"]),
        "photos": len(jobs),
    }
    for s in ("val", "test"):
        counts[f"{s}_landmark_photos"] = sum(j["landmark_id"] != "" for j in splits[s])
        counts[f"{s}_non_landmark_photos"] = sum(j["landmark_id"] == "" for j in splits[s])
    return {
        "seed": seed, "preset": preset, "generator": VERSION, "image_size": p["size"],
        "frequent_threshold": p["frequent_threshold"], "counts": counts,
        "fractions": {
            "dirty_train_labels": round(sum(j["dirty_kind"] != "" for j in labelled) / len(labelled), 4),
            "hard_negatives": round(len(hard) / max(1, len(negatives)), 4),
            "with_gps": round(sum(j["gps"] is not None for j in jobs) / len(jobs), 4),
            "test_frequent": round(sum(j.get("frequent") == 1 for j in splits["test"]) / max(1, counts["test_landmark_photos"]), 4),
        },
    }
