"""contact_sheet.png: labelled rows of a generated world's photos, for a person to look at."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

TILE, PER_ROW, TITLE, CAPTION = 96, 12, 14, 12


def _rows(landmarks: list[dict], splits: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    train = [j for j in splits["train"] if j["landmark_id"] != ""]
    clean = [j for j in train if j["dirty_kind"] == ""]
    refs = splits["references"]
    rows = []
    families: dict[str, list[dict]] = {}
    for r in landmarks:
        if r["family"]:
            families.setdefault(r["family"], []).append(r)
    for fam, members in sorted(families.items())[:6]:
        tiles = []
        per = max(1, PER_ROW // len(members))
        for m in members:
            ref = [j for j in refs if j["landmark_id"] == m["id"]][:1]
            photos = [j for j in clean if j["landmark_id"] == m["id"] and j.get("aspect", 0) == 0][:per - len(ref)]
            tiles += [(f"L{m['id']} ref", j["path"]) for j in ref] + [(f"L{m['id']}", j["path"]) for j in photos]
        rows.append((f"look-alike family {fam}: landmarks {[m['id'] for m in members]} (reference + training photos)", tiles))
    two = [r for r in landmarks if r["n_aspects"] == 2][:4]
    for start in range(0, len(two), 2):
        tiles = []
        for r in two[start:start + 2]:
            for aspect in (0, 1):
                tiles += [(f"L{r['id']} aspect {aspect}", j["path"]) for j in clean
                          if j["landmark_id"] == r["id"] and j["aspect"] == aspect][:3]
        rows.append((f"two-aspect landmarks {[r['id'] for r in two[start:start + 2]]}: aspect 0 (front) vs 1 (side/distant)", tiles))
    natural = [r for r in landmarks if r["kind"] in ("lake", "ridge", "waterfall")][:4]
    tiles = []
    for r in natural:
        tiles += [(f"L{r['id']} {r['kind']}", j["path"]) for j in clean if j["landmark_id"] == r["id"]][:PER_ROW // max(1, len(natural))]
    rows.append((f"natural landmarks {[r['id'] for r in natural]} (weak structure)", tiles))
    test = splits["test"]
    for hard in ("family_member", "palette", "beside", "natural"):
        tiles = [(hard, j["path"]) for j in test if j["kind"] == f"hard_negative:{hard}"][:PER_ROW]
        if tiles:
            rows.append((f"test NON-landmarks, hard negative: {hard}", tiles))
    rows.append(("test NON-landmarks: everyday photos", [("everyday", j["path"]) for j in test if j["kind"] == "everyday"][:PER_ROW]))
    dirty = [j for j in train if j["dirty_kind"]]
    tiles = [(f"L{j['landmark_id']}<-{('L' + str(j['true_landmark_id'])) if j['true_landmark_id'] != '' else j['dirty_kind'][:7]}",
              j["path"]) for j in dirty[:PER_ROW]]
    rows.append(("dirty training labels (label <- what the photo really shows)", tiles))
    return rows


def write_contact_sheet(out: Path, landmarks: list[dict], splits: dict) -> Path:
    rows = _rows(landmarks, splits)
    height = len(rows) * (TITLE + CAPTION + TILE + 4)
    sheet = Image.new("RGB", (PER_ROW * TILE, height), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    y = 0
    for title, tiles in rows:
        d.text((2, y), title, fill=(160, 0, 0))
        y += TITLE
        for k, (caption, path) in enumerate(tiles[:PER_ROW]):
            with Image.open(out / path) as img:
                sheet.paste(img.convert("RGB").resize((TILE, TILE)), (k * TILE, y + CAPTION))
            d.text((k * TILE + 2, y), caption, fill=(0, 0, 0))
        y += CAPTION + TILE + 4
    path = out / "contact_sheet.png"
    sheet.save(path)
    return path
