"""Procedural drawing for the synthetic world: landmark specs, scenes and the "camera".

A landmark is a small dict (its *spec*) fixed when the world is planned; every photo of it redraws the
spec into a fresh scene (sky, ground, clutter, maybe the building beside it) and photographs that
scene with its own framing, rotation, perspective, light, noise and occluders. Everything is drawn with
Pillow on a canvas twice the photo size (scenes and the camera: world_scenes.py).
"""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw

BUILDING_KINDS = ("facade", "tower", "dome", "arch", "monument")
NATURAL_KINDS = ("lake", "ridge", "waterfall")
TOPS = ("gable", "flat", "dome", "spire", "onion", "crenel", "pyramid")
WINDOWS = ("rect", "arch", "round", "slit", "double")
ORNAMENTS = ("clock", "rose", "flag", "statue", "band", "none")

_STONE = [(222, 206, 170), (196, 180, 150), (170, 80, 60), (230, 225, 215), (150, 150, 140),
          (205, 160, 110), (120, 110, 100), (240, 230, 190), (180, 200, 190), (110, 70, 60),
          (215, 190, 200), (95, 110, 90)]
_ROOF = [(90, 110, 120), (150, 60, 40), (60, 60, 70), (90, 140, 110), (190, 160, 60),
         (120, 40, 40), (70, 90, 140), (200, 200, 205)]


class SafeDraw(ImageDraw.ImageDraw):
    """ImageDraw that accepts boxes given in either corner order (procedural sizes can flip)."""

    @staticmethod
    def _box(xy):
        (x0, y0, x1, y1) = xy
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def rectangle(self, xy, *a, **k):
        return super().rectangle(self._box(xy), *a, **k)

    def ellipse(self, xy, *a, **k):
        return super().ellipse(self._box(xy), *a, **k)

    def pieslice(self, xy, *a, **k):
        return super().pieslice(self._box(xy), *a, **k)

    def rounded_rectangle(self, xy, *a, **k):
        return super().rounded_rectangle(self._box(xy), *a, **k)


def c8(color) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(v)))) for v in color)


def _jit(rng: np.random.Generator, color, amount: float) -> tuple[int, int, int]:
    return c8(np.asarray(color, dtype=float) + rng.normal(0, amount, 3))


def _shade(color, factor: float) -> tuple[int, int, int]:
    return c8(np.asarray(color, dtype=float) * factor)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


# ----------------------------------------------------------------------------------------- specs

def building_spec(rng: np.random.Generator, kind: str) -> dict:
    """A random building-like landmark of `kind` (all numbers relative to the nominal height 1)."""
    spec = {
        "kind": kind,
        "wall": _jit(rng, _pick(rng, _STONE), 18), "roof": _jit(rng, _pick(rng, _ROOF), 18),
        "accent": c8(rng.integers(20, 240, 3)), "window": c8(rng.integers(10, 90, 3)),
        "width": float(rng.uniform(0.8, 1.5)), "body_h": float(rng.uniform(0.45, 0.7)),
        "floors": int(rng.integers(2, 5)), "cols": int(rng.integers(3, 9)),
        "win": _pick(rng, WINDOWS), "top": _pick(rng, TOPS), "towers": int(rng.integers(0, 3)),
        "tower_w": float(rng.uniform(0.12, 0.22)), "tower_h": float(rng.uniform(0.25, 0.5)),
        "tower_top": _pick(rng, TOPS), "columns": int(rng.choice([0, 0, 4, 6])),
        "ornament": _pick(rng, ORNAMENTS), "door": bool(rng.random() < 0.7),
        "side_width": float(rng.uniform(0.45, 0.75)), "side_cols": int(rng.integers(2, 6)),
        "stages": int(rng.integers(2, 5)), "arches": int(rng.choice([1, 1, 3])),
        "figure": _pick(rng, ("obelisk", "column", "figure", "rider")),
    }
    if kind == "tower":
        spec.update(width=float(rng.uniform(0.25, 0.4)), body_h=float(rng.uniform(0.7, 0.85)), towers=0)
    elif kind == "dome":
        spec.update(top="flat", towers=int(rng.choice([0, 2, 2])), tower_top=_pick(rng, ("spire", "onion", "dome")),
                    dome_w=float(rng.uniform(0.35, 0.6)), dome_h=float(rng.uniform(0.25, 0.4)),
                    body_h=float(rng.uniform(0.35, 0.5)))
    elif kind == "arch":
        spec.update(width=float(rng.uniform(0.8, 1.2)), body_h=float(rng.uniform(0.6, 0.85)), towers=0, top="flat")
    elif kind == "monument":
        spec.update(width=float(rng.uniform(0.25, 0.45)), body_h=float(rng.uniform(0.15, 0.3)), towers=0)
    return spec


# what family members may differ in (a family shares kind, proportions and palette)
_DETAILS = {
    "win": WINDOWS, "top": TOPS, "tower_top": TOPS, "ornament": ORNAMENTS,
    "cols": (3, 4, 5, 6, 7, 8), "floors": (2, 3, 4), "towers": (0, 1, 2), "columns": (0, 4, 6),
}


def family_member(template: dict, rng: np.random.Generator, n_changes: int = 2) -> dict:
    """The template with 2–3 details changed and its colours nudged: a look-alike."""
    spec = dict(template)
    keys = [k for k in _DETAILS if not (template["kind"] in ("tower", "arch", "monument") and k == "towers")]
    for key in rng.choice(keys, size=n_changes, replace=False):
        options = [v for v in _DETAILS[str(key)] if v != template[str(key)]]
        spec[str(key)] = _pick(rng, options)
    spec["accent"] = _jit(rng, template["accent"], 40)
    spec["wall"] = _jit(rng, template["wall"], 10)
    spec["width"] = float(template["width"] * rng.uniform(0.9, 1.1))
    return spec


def natural_spec(rng: np.random.Generator, kind: str) -> dict:
    n = 9
    return {
        "kind": kind,
        "profile": [float(v) for v in rng.uniform(0.1, 1.0, n)],
        "profile2": [float(v) for v in rng.uniform(0.1, 1.0, n)],
        "horizon": float(rng.uniform(0.45, 0.65)),
        "rock": _jit(rng, _pick(rng, [(110, 105, 100), (140, 120, 95), (95, 100, 115), (130, 90, 70)]), 12),
        "veg": _jit(rng, _pick(rng, [(70, 120, 60), (110, 140, 70), (60, 95, 70), (150, 150, 90)]), 15),
        "water": _jit(rng, _pick(rng, [(50, 90, 140), (60, 120, 130), (40, 70, 100), (90, 140, 160)]), 12),
        "peak_h": float(rng.uniform(0.2, 0.45)), "snow": float(rng.uniform(0.0, 0.5)),
        "lake_w": float(rng.uniform(0.5, 0.95)), "lake_h": float(rng.uniform(0.1, 0.22)),
        "island": bool(rng.random() < 0.4), "falls": int(rng.integers(1, 4)),
        "fall_w": float(rng.uniform(0.04, 0.12)),
    }


def palette_remix(spec: dict, rng: np.random.Generator) -> dict:
    """A landmark's palette in a new layout (a hard negative)."""
    kind = spec["kind"]
    if kind in NATURAL_KINDS:
        new = natural_spec(rng, kind)
        for key in ("rock", "veg", "water"):
            new[key] = spec[key]
        return new
    new = building_spec(rng, _pick(rng, BUILDING_KINDS))
    for key in ("wall", "roof", "accent", "window"):
        new[key] = spec[key]
    return new


def generic_spec(rng: np.random.Generator) -> dict:
    """A plain building (apartment block, office, shop row)."""
    spec = building_spec(rng, "facade")
    spec.update(top=_pick(rng, ("flat", "flat", "gable")), towers=0, columns=0, ornament="none",
                win=_pick(rng, ("rect", "rect", "double")), floors=int(rng.integers(3, 7)),
                cols=int(rng.integers(4, 10)), wall=c8(rng.integers(90, 235, 3)))
    return spec


# ------------------------------------------------------------------------------------ primitives

def _window(d: ImageDraw.ImageDraw, shape: str, x0, y0, x1, y1, color):
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    if shape == "rect":
        d.rectangle([x0, y0, x1, y1], fill=color)
    elif shape == "arch":
        r = (x1 - x0) / 2
        d.rectangle([x0, y0 + r, x1, y1], fill=color)
        d.pieslice([x0, y0, x1, y0 + 2 * r], 180, 360, fill=color)
    elif shape == "round":
        m = min(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        d.ellipse([cx - m / 2, cy - m / 2, cx + m / 2, cy + m / 2], fill=color)
    elif shape == "slit":
        cx = (x0 + x1) / 2
        w = max(1.0, (x1 - x0) / 4)
        d.rectangle([cx - w, y0, cx + w, y1], fill=color)
    else:  # double
        mid = (x0 + x1) / 2
        d.rectangle([x0, y0, mid - 1, y1], fill=color)
        d.rectangle([mid + 1, y0, x1, y1], fill=color)


def _top(d: ImageDraw.ImageDraw, shape: str, x0, x1, y, h, color, accent):
    """A roof/top of kind `shape` on the segment x0..x1 at height y, about h tall."""
    w = x1 - x0
    cx = (x0 + x1) / 2
    if shape == "gable":
        d.polygon([(x0 - w * 0.03, y), (cx, y - h * 0.6), (x1 + w * 0.03, y)], fill=color)
    elif shape == "flat":
        d.rectangle([x0 - w * 0.04, y - h * 0.12, x1 + w * 0.04, y], fill=color)
    elif shape == "dome":
        d.pieslice([x0, y - h * 0.8, x1, y + h * 0.8], 180, 360, fill=color)
    elif shape == "spire":
        d.polygon([(x0, y), (cx, y - h * 1.6), (x1, y)], fill=color)
    elif shape == "onion":
        d.ellipse([x0 - w * 0.1, y - h * 0.9, x1 + w * 0.1, y + h * 0.1], fill=color)
        d.polygon([(cx - w * 0.2, y - h * 0.7), (cx, y - h * 1.4), (cx + w * 0.2, y - h * 0.7)], fill=color)
        d.line([(cx, y - h * 1.4), (cx, y - h * 1.7)], fill=accent, width=max(1, int(w * 0.08)))
    elif shape == "crenel":
        n = 5
        for i in range(n):
            if i % 2 == 0:
                d.rectangle([x0 + i * w / n, y - h * 0.25, x0 + (i + 1) * w / n, y], fill=color)
    else:  # pyramid
        d.polygon([(x0, y), (cx, y - h * 0.9), (x1, y)], fill=color)


def _ornament(d: ImageDraw.ImageDraw, kind: str, cx, y, s, accent, window):
    if kind == "clock":
        d.ellipse([cx - s, y - s, cx + s, y + s], fill=(235, 232, 220), outline=window)
        d.line([(cx, y), (cx, y - s * 0.7)], fill=window, width=1)
    elif kind == "rose":
        d.ellipse([cx - s * 1.2, y - s * 1.2, cx + s * 1.2, y + s * 1.2], fill=accent)
        d.ellipse([cx - s * 0.5, y - s * 0.5, cx + s * 0.5, y + s * 0.5], fill=window)
    elif kind == "flag":
        d.line([(cx, y + s), (cx, y - s * 3)], fill=(40, 40, 40), width=max(1, int(s * 0.2)))
        d.polygon([(cx, y - s * 3), (cx + s * 2, y - s * 2.4), (cx, y - s * 1.8)], fill=accent)
    elif kind == "statue":
        d.ellipse([cx - s * 0.4, y - s * 2.2, cx + s * 0.4, y - s * 1.4], fill=accent)
        d.polygon([(cx - s * 0.6, y), (cx, y - s * 1.5), (cx + s * 0.6, y)], fill=accent)
    elif kind == "band":
        d.rectangle([cx - s * 6, y - s * 0.3, cx + s * 6, y + s * 0.3], fill=accent)


# ------------------------------------------------------------------------------------- buildings

def draw_building(d: ImageDraw.ImageDraw, spec: dict, cx: float, ground: float, H: float, side: bool = False):
    """Draws `spec` standing on `ground`, centred at cx, nominal height H. `side`: the side aspect."""
    kind = spec["kind"]
    if kind == "monument":
        return _draw_monument(d, spec, cx, ground, H, side)
    wall, roof, accent, window = spec["wall"], spec["roof"], spec["accent"], spec["window"]
    W = spec["width"] * H * (spec["side_width"] if side else 1.0)
    Hb = spec["body_h"] * H
    x0, x1, top = cx - W / 2, cx + W / 2, ground - Hb
    if side:  # the side wall, plus the front face seen at a steep angle as a darker sheared strip
        fw = W * 0.35
        d.polygon([(x1, top), (x1 + fw, top + Hb * 0.08), (x1 + fw, ground), (x1, ground)], fill=_shade(wall, 0.7))
        for f in range(spec["floors"]):
            fy = top + Hb * (0.15 + 0.8 * f / spec["floors"])
            d.line([(x1 + fw * 0.2, fy), (x1 + fw * 0.8, fy + Hb * 0.03)], fill=_shade(window, 0.9), width=max(1, int(H * 0.02)))
    d.rectangle([x0, top, x1, ground], fill=wall)
    if kind == "arch":
        n = spec["arches"]
        for i in range(n):
            big = n == 1 or i == n // 2
            aw = W * (0.36 if big else 0.16) if n > 1 else W * 0.42
            ax = x0 + W * (i + 0.5) / n
            ah = Hb * (0.68 if big else 0.45)
            _window(d, "arch", ax - aw / 2, ground - ah, ax + aw / 2, ground, _shade(window, 1.3))
        d.rectangle([x0, top, x1, top + Hb * 0.18], fill=_shade(wall, 0.88))  # attic
        d.rectangle([x0, top + Hb * 0.18, x1, top + Hb * 0.21], fill=accent)
        _top(d, spec["top"], x0, x1, top, Hb * 0.3, roof, accent)
        if spec["ornament"] != "none":
            _ornament(d, "statue", cx, top, H * 0.07, accent, window)
        return
    floors = spec["floors"] if kind != "tower" else spec["stages"] + 2
    cols = (spec["side_cols"] if side else spec["cols"]) if kind != "tower" else (1 if side else 2)
    lower = 0.25 if spec["columns"] and not side else 0.08
    for f in range(floors):
        fy0 = top + Hb * (0.12 + (0.88 - lower) * f / floors)
        fh = Hb * (0.88 - lower) / floors
        for c in range(cols):
            wx0 = x0 + W * (0.08 + 0.84 * c / cols)
            ww = W * 0.84 / cols
            _window(d, spec["win"], wx0 + ww * 0.22, fy0 + fh * 0.2, wx0 + ww * 0.78, fy0 + fh * 0.75, window)
    if spec["columns"] and not side:
        n = spec["columns"]
        py = ground - Hb * lower
        for i in range(n):
            px = x0 + W * (0.15 + 0.7 * i / (n - 1))
            d.rectangle([px - W * 0.02, py, px + W * 0.02, ground], fill=_shade(wall, 1.12))
        d.polygon([(x0 + W * 0.1, py), (cx, py - Hb * 0.12), (x1 - W * 0.1, py)], fill=_shade(wall, 0.85))
    elif spec["door"] and not side:
        dw = W * 0.12
        _window(d, "arch", cx - dw / 2, ground - Hb * 0.22, cx + dw / 2, ground, _shade(window, 0.7))
    if kind == "tower" and not side:
        for s in range(1, spec["stages"]):  # cornices between stages
            sy = top + Hb * s / spec["stages"] * 0.9
            d.rectangle([x0 - W * 0.06, sy, x1 + W * 0.06, sy + max(1, H * 0.015)], fill=accent)
    _top(d, spec["top"] if kind != "dome" else "flat", x0, x1, top, min(W, H * 0.5) * 0.5, roof, accent)
    if kind == "dome":
        dw = spec["dome_w"] * H * (0.8 if side else 1.0)
        dh = spec["dome_h"] * H
        d.rectangle([cx - dw * 0.4, top - dh * 0.35, cx + dw * 0.4, top], fill=_shade(wall, 0.92))
        d.pieslice([cx - dw / 2, top - dh * 0.35 - dh, cx + dw / 2, top - dh * 0.35 + dh], 180, 360, fill=roof)
        d.rectangle([cx - dw * 0.05, top - dh * 1.55, cx + dw * 0.05, top - dh * 1.3], fill=accent)
    ntw = spec["towers"]
    if ntw and kind != "tower":
        tw, th = spec["tower_w"] * H, spec["tower_h"] * H
        xs = [cx] if ntw == 1 else ([x0 + tw / 2, x1 - tw / 2] if not side else [x1 - tw / 2, x1 - tw * 0.2])
        for i, tx in enumerate(xs):
            col = wall if i == 0 or not side else _shade(wall, 0.75)
            d.rectangle([tx - tw / 2, top - th, tx + tw / 2, top], fill=col)
            _window(d, spec["win"], tx - tw * 0.25, top - th * 0.8, tx + tw * 0.25, top - th * 0.3, window)
            _top(d, spec["tower_top"], tx - tw / 2, tx + tw / 2, top - th, tw * 0.8, roof, accent)
    orn = spec["ornament"]
    if orn != "none" and not side:
        oy = top + Hb * 0.06 if kind != "tower" else top + Hb * 0.08
        _ornament(d, orn, cx, oy if orn != "flag" else top, max(2.0, H * 0.035), accent, window)


def _draw_monument(d, spec, cx, ground, H, side):
    wall, accent = spec["wall"], spec["accent"]
    pw, ph = spec["width"] * H * (0.7 if side else 1.0), spec["body_h"] * H
    d.rectangle([cx - pw / 2, ground - ph, cx + pw / 2, ground], fill=wall)
    d.rectangle([cx - pw / 2 - H * 0.03, ground - ph, cx + pw / 2 + H * 0.03, ground - ph + H * 0.03], fill=_shade(wall, 0.8))
    top = ground - ph
    fig, dark = spec["figure"], _shade(accent, 0.6)
    if fig == "obelisk":
        d.polygon([(cx - pw * 0.25, top), (cx - pw * 0.12, top - H * 0.7), (cx, top - H * 0.8),
                   (cx + pw * 0.12, top - H * 0.7), (cx + pw * 0.25, top)], fill=_shade(wall, 0.95))
    elif fig == "column":
        d.rectangle([cx - pw * 0.12, top - H * 0.6, cx + pw * 0.12, top], fill=_shade(wall, 1.05))
        d.ellipse([cx - H * 0.04, top - H * 0.74, cx + H * 0.04, top - H * 0.64], fill=dark)
        d.polygon([(cx - H * 0.05, top - H * 0.6), (cx, top - H * 0.68), (cx + H * 0.05, top - H * 0.6)], fill=dark)
    elif fig == "figure":
        d.polygon([(cx - pw * 0.3, top), (cx - pw * 0.15, top - H * 0.45), (cx + pw * 0.15, top - H * 0.45),
                   (cx + pw * 0.3, top)], fill=dark)
        d.ellipse([cx - H * 0.06, top - H * 0.58, cx + H * 0.06, top - H * 0.44], fill=dark)
        arm = 1 if not side else -1
        d.line([(cx, top - H * 0.38), (cx + arm * H * 0.18, top - H * 0.55)], fill=dark, width=max(1, int(H * 0.04)))
    else:  # rider
        d.ellipse([cx - H * 0.22, top - H * 0.3, cx + H * 0.18, top - H * 0.12], fill=dark)
        for lx in (-0.16, -0.08, 0.06, 0.13):
            d.line([(cx + lx * H, top - H * 0.15), (cx + lx * H, top)], fill=dark, width=max(1, int(H * 0.025)))
        d.polygon([(cx + H * 0.12, top - H * 0.25), (cx + H * 0.3, top - H * 0.42), (cx + H * 0.22, top - H * 0.2)], fill=dark)
        d.rectangle([cx - H * 0.06, top - H * 0.5, cx + H * 0.02, top - H * 0.26], fill=dark)
        d.ellipse([cx - H * 0.06, top - H * 0.6, cx + H * 0.02, top - H * 0.5], fill=dark)


# --------------------------------------------------------------------------------------- natural

def _profile(values, x0, x1, base, amp, n=40):
    xs = np.linspace(0, 1, n)
    v = np.interp(xs * (len(values) - 1), np.arange(len(values)), values)
    return [(x0 + (x1 - x0) * x, base - amp * y) for x, y in zip(xs, v)]


def draw_natural(d: ImageDraw.ImageDraw, spec: dict, C: int, aspect: int, rng: np.random.Generator):
    kind = spec["kind"]
    prof = spec["profile"] if aspect == 0 else spec["profile2"]
    horizon = C * (spec["horizon"] - (0.12 if aspect else 0.0))
    amp = C * spec["peak_h"] * (0.6 if kind == "lake" else 1.0)
    pts = _profile(prof, -C * 0.1, C * 1.1, horizon, amp)
    d.polygon(pts + [(C * 1.1, C), (-C * 0.1, C)], fill=spec["rock"] if kind != "lake" else _shade(spec["veg"], 0.8))
    if spec["snow"] > 0.15 and kind == "ridge":
        snow = [(x, y) for x, y in pts if y < horizon - amp * (1 - spec["snow"])]
        for x, y in snow:
            d.polygon([(x - C * 0.03, y + amp * 0.12), (x, y), (x + C * 0.03, y + amp * 0.12)], fill=(240, 240, 245))
    if kind == "ridge":
        d.rectangle([0, horizon + C * 0.12, C, C], fill=spec["veg"])
        far = _profile(prof[::-1], -C * 0.1, C * 1.1, horizon + C * 0.14, amp * 0.25)
        d.polygon(far + [(C * 1.1, C), (-C * 0.1, C)], fill=_shade(spec["veg"], 0.85))
    elif kind == "lake":
        d.rectangle([0, horizon, C, C], fill=spec["veg"])
        lw, lh = spec["lake_w"] * C * (1.2 if aspect else 1.0), spec["lake_h"] * C * (1.8 if aspect else 1.0)
        cy = horizon + lh * 0.7
        d.ellipse([C / 2 - lw / 2, cy - lh / 2, C / 2 + lw / 2, cy + lh / 2], fill=spec["water"])
        d.ellipse([C / 2 - lw * 0.3, cy - lh * 0.2, C / 2 + lw * 0.1, cy + lh * 0.55], fill=spec["water"])
        if spec["island"]:
            d.ellipse([C / 2 + lw * 0.05, cy - lh * 0.15, C / 2 + lw * 0.2, cy + lh * 0.1], fill=_shade(spec["veg"], 0.7))
    else:  # waterfall
        d.rectangle([0, horizon + amp * 0.1, C, C], fill=spec["veg"])
        cliff_top = horizon - amp * 0.8
        d.rectangle([C * 0.2, cliff_top, C * 0.8, horizon + C * 0.15], fill=spec["rock"])
        n = spec["falls"]
        for i in range(n):
            fx = C * (0.5 + (i - (n - 1) / 2) * 0.15 * (0.6 if aspect else 1.0))
            fw = spec["fall_w"] * C
            d.rectangle([fx - fw / 2, cliff_top, fx + fw / 2, horizon + C * 0.15], fill=(225, 235, 240))
        d.ellipse([C * 0.25, horizon + C * 0.1, C * 0.75, horizon + C * 0.25], fill=spec["water"])
        d.ellipse([C * 0.35, horizon + C * 0.08, C * 0.65, horizon + C * 0.16], fill=(235, 240, 245))
