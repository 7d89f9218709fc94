"""Scenes (sky, ground, street clutter, everyday photos) and the camera that photographs them."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from shared.training.world_render import (NATURAL_KINDS, SafeDraw, _jit, _pick, _shade, c8, draw_building,
                                          draw_natural, natural_spec)

# ------------------------------------------------------------------------------------------ scenes

def _sky(rng: np.random.Generator, C: int) -> np.ndarray:
    mood = rng.random()
    if mood < 0.5:
        top, bottom = (60, 120, 210), (170, 210, 240)
    elif mood < 0.72:
        top, bottom = (140, 140, 150), (200, 200, 205)
    elif mood < 0.9:
        top, bottom = (90, 80, 150), (245, 160, 90)
    else:
        top, bottom = (15, 20, 45), (70, 60, 90)
    top, bottom = np.asarray(_jit(rng, top, 20), float), np.asarray(_jit(rng, bottom, 20), float)
    t = np.linspace(0, 1, C)[:, None]
    grad = top * (1 - t) + bottom * t
    return np.broadcast_to(grad[:, None, :], (C, C, 3)).astype(np.uint8)


def _clouds(d, rng, C, horizon):
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, C), rng.uniform(0, horizon * 0.5)
        w, h = rng.uniform(0.1, 0.3) * C, rng.uniform(0.03, 0.08) * C
        d.ellipse([x - w, y - h, x + w, y + h], fill=_jit(rng, (235, 235, 240), 10))


def _tree(d, rng, x, ground, s):
    d.rectangle([x - s * 0.08, ground - s * 0.6, x + s * 0.08, ground], fill=_jit(rng, (90, 65, 40), 10))
    d.ellipse([x - s * 0.4, ground - s * 1.2, x + s * 0.4, ground - s * 0.45], fill=_jit(rng, (60, 120, 55), 25))


def _generic_block(d, rng, x, ground, w, h):
    wall = c8(rng.integers(70, 235, 3))
    d.rectangle([x, ground - h, x + w, ground], fill=wall)
    win = _shade(wall, rng.uniform(0.3, 0.6))
    rows, cols = max(1, int(h / max(4, w / 4) * 0.5)), int(rng.integers(2, 6))
    for r in range(min(rows, 8)):
        for c in range(cols):
            wx, wy = x + w * (c + 0.25) / cols, ground - h + h * (r + 0.25) / min(rows, 8)
            d.rectangle([wx, wy, wx + w * 0.5 / cols, wy + h * 0.45 / min(rows, 8)], fill=win)


def _street_clutter(d, rng, C, ground, n, avoid=None):
    for _ in range(n):
        w, h = rng.uniform(0.12, 0.35) * C, rng.uniform(0.15, 0.6) * C
        x = rng.uniform(-0.1, 1.0) * C
        if avoid and avoid[0] - w < x < avoid[1] and rng.random() < 0.7:
            x = avoid[0] - w if rng.random() < 0.5 else avoid[1]
        _generic_block(d, rng, x, ground, w, h)


def _wires(d, rng, C):
    for _ in range(int(rng.integers(0, 3))):
        y0, y1 = rng.uniform(0, 0.5, 2) * C
        d.line([(0, y0), (C, y1)], fill=(30, 30, 30), width=1)


def new_canvas(rng: np.random.Generator, C: int, ground_color=None):
    sky = Image.fromarray(np.ascontiguousarray(_sky(rng, C)))
    d = SafeDraw(sky)
    horizon = C * rng.uniform(0.7, 0.82)
    _clouds(d, rng, C, horizon)
    if ground_color is None:
        ground_color = _pick(rng, [(120, 120, 115), (150, 140, 125), (90, 130, 70), (170, 165, 150)])
    d.rectangle([0, horizon, C, C], fill=_jit(rng, ground_color, 12))
    return sky, d, horizon


def landmark_scene(spec: dict, aspect: int, rng: np.random.Generator, C: int, beside: dict | None = None) -> tuple[Image.Image, tuple]:
    """A scene with the landmark in it; returns the canvas and the landmark's centre (x, y)."""
    if spec["kind"] in NATURAL_KINDS:
        img = Image.fromarray(np.ascontiguousarray(_sky(rng, C)))
        d = SafeDraw(img)
        _clouds(d, rng, C, C * spec["horizon"])
        draw_natural(d, spec, C, aspect, rng)
        for _ in range(int(rng.integers(0, 4))):
            _tree(d, rng, rng.uniform(0, C), C * rng.uniform(0.8, 1.0), C * rng.uniform(0.1, 0.3))
        return img, (C / 2, C * spec["horizon"])
    img, d, ground = new_canvas(rng, C)
    H = C * (0.36 if aspect == 0 else 0.22)
    cx = C / 2 + rng.normal(0, 0.03) * C
    W = spec["width"] * H
    _street_clutter(d, rng, C, ground - C * 0.02, int(rng.integers(1, 5)), avoid=(cx - W / 2, cx + W / 2))
    if beside is not None and rng.random() < 0.4:
        side = 1 if rng.random() < 0.5 else -1
        bx = cx + side * (W / 2 + beside["width"] * H * 0.45)
        draw_building(d, beside, bx, ground, H * 0.8)
    draw_building(d, spec, cx, ground, H, side=aspect == 1)
    if aspect == 1:  # seen from a street: nearer buildings frame it
        for xs in ((-0.05, 0.25), (0.75, 1.05)):
            if rng.random() < 0.8:
                x = rng.uniform(*xs) * C
                _generic_block(d, rng, x - 0.12 * C, C, rng.uniform(0.2, 0.3) * C, rng.uniform(0.5, 0.8) * C)
    for _ in range(int(rng.integers(0, 3))):
        _tree(d, rng, rng.uniform(0, C), ground + rng.uniform(0, 0.1) * C, C * rng.uniform(0.08, 0.2))
    _wires(d, rng, C)
    return img, (cx, ground - H * 0.55)


def object_scene(spec: dict, rng: np.random.Generator, C: int) -> tuple[Image.Image, tuple]:
    """A registered-looking object that is not a landmark (hard negatives: family member, remix, beside)."""
    if spec["kind"] in NATURAL_KINDS:
        return landmark_scene(spec, int(rng.integers(0, 2)), rng, C)
    img, d, ground = new_canvas(rng, C)
    H = C * rng.uniform(0.28, 0.4)
    cx = C / 2 + rng.normal(0, 0.03) * C
    _street_clutter(d, rng, C, ground - C * 0.02, int(rng.integers(1, 5)), avoid=(cx - spec["width"] * H / 2, cx + spec["width"] * H / 2))
    draw_building(d, spec, cx, ground, H, side=bool(rng.random() < 0.2))
    for _ in range(int(rng.integers(0, 3))):
        _tree(d, rng, rng.uniform(0, C), ground + rng.uniform(0, 0.1) * C, C * rng.uniform(0.08, 0.2))
    _wires(d, rng, C)
    return img, (cx, ground - H * 0.55)


EVERYDAY = ("home", "portrait", "street", "nature", "object")


def everyday_scene(sub: str, rng: np.random.Generator, C: int) -> tuple[Image.Image, tuple]:
    if sub == "street":
        img, d, ground = new_canvas(rng, C)
        _street_clutter(d, rng, C, ground, int(rng.integers(3, 8)))
        for _ in range(int(rng.integers(0, 3))):
            _tree(d, rng, rng.uniform(0, C), ground, C * rng.uniform(0.1, 0.25))
        _wires(d, rng, C)
        return img, (C / 2, C * 0.55)
    if sub == "nature":
        spec = natural_spec(rng, _pick(rng, ("lake", "ridge", "ridge")))
        spec["peak_h"] *= 0.5  # parks, fields, hills: weaker than the registered natural features
        img, centre = landmark_scene(spec, 0, rng, C)
        d = SafeDraw(img)
        for _ in range(int(rng.integers(1, 6))):
            _tree(d, rng, rng.uniform(0, C), C * rng.uniform(0.75, 1.0), C * rng.uniform(0.1, 0.35))
        return img, centre
    # indoor scenes: a wall, a floor, furniture, people, things on a table
    wall = c8(rng.integers(120, 240, 3))
    img = Image.new("RGB", (C, C), wall)
    d = SafeDraw(img)
    floor_y = C * rng.uniform(0.6, 0.8)
    d.rectangle([0, floor_y, C, C], fill=c8(rng.integers(60, 180, 3)))
    if rng.random() < 0.6:  # a window or a picture on the wall
        x, y, w, h = rng.uniform(0, 0.7) * C, rng.uniform(0.05, 0.3) * C, rng.uniform(0.15, 0.35) * C, rng.uniform(0.15, 0.3) * C
        d.rectangle([x, y, x + w, y + h], fill=c8(rng.integers(0, 255, 3)), outline=(250, 250, 250), width=2)
    for _ in range(int(rng.integers(1, 5))):  # furniture
        x, w, h = rng.uniform(-0.1, 0.9) * C, rng.uniform(0.15, 0.5) * C, rng.uniform(0.1, 0.35) * C
        d.rectangle([x, floor_y - h, x + w, floor_y + C * 0.05], fill=c8(rng.integers(20, 220, 3)))
    people = {"portrait": 1, "home": int(rng.integers(0, 3)), "object": 0}[sub]
    for _ in range(people):
        s = C * (rng.uniform(0.5, 0.8) if sub == "portrait" else rng.uniform(0.25, 0.45))
        x = C / 2 + rng.normal(0, 0.1 if sub == "portrait" else 0.25) * C
        _person(d, rng, x, C + s * 0.1, s)
    if sub == "object":
        d.ellipse([C * 0.1, C * 0.45, C * 0.9, C * 0.95], fill=c8(rng.integers(60, 200, 3)))
        for _ in range(int(rng.integers(1, 4))):
            x, y, r = rng.uniform(0.25, 0.75) * C, rng.uniform(0.55, 0.8) * C, rng.uniform(0.06, 0.14) * C
            d.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=(240, 240, 235))
            d.ellipse([x - r * 0.6, y - r * 0.4, x + r * 0.6, y + r * 0.4], fill=c8(rng.integers(40, 230, 3)))
    return img, (C / 2, C / 2)


def _person(d, rng, x, feet, s):
    skin = _pick(rng, [(240, 200, 170), (200, 150, 110), (140, 95, 65), (90, 60, 40)])
    cloth = c8(rng.integers(10, 240, 3))
    d.polygon([(x - s * 0.22, feet), (x - s * 0.16, feet - s * 0.62), (x + s * 0.16, feet - s * 0.62), (x + s * 0.22, feet)], fill=cloth)
    d.ellipse([x - s * 0.1, feet - s * 0.86, x + s * 0.1, feet - s * 0.6], fill=skin)
    d.pieslice([x - s * 0.11, feet - s * 0.88, x + s * 0.11, feet - s * 0.66], 180, 360, fill=c8(rng.integers(10, 120, 3)))


# ------------------------------------------------------------------------------------------ camera

def _homography(src, dst) -> list[float]:
    """Coefficients a..h with dst = (a x + b y + c) / (g x + h y + 1) for points src → dst."""
    A, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        A.append([x, y, 1, 0, 0, 0, -u * x, -u * y]); b.append(u)
        A.append([0, 0, 0, x, y, 1, -v * x, -v * y]); b.append(v)
    return [float(v) for v in np.linalg.solve(np.asarray(A, float), np.asarray(b, float))]


def _occluders(d, rng, out, n):
    for _ in range(n):
        kind = rng.random()
        s = out * rng.uniform(0.2, 0.7)
        x = rng.uniform(0, out)
        if kind < 0.35:
            _person(d, rng, x, out + s * 0.05, s)
        elif kind < 0.6:
            _tree(d, rng, x, out * rng.uniform(0.95, 1.1), s)
        elif kind < 0.8:  # a car or a bus
            w, h = s * rng.uniform(0.8, 1.6), s * rng.uniform(0.3, 0.6)
            y = out - h * rng.uniform(0.5, 1.0)
            d.rounded_rectangle([x - w / 2, y - h, x + w / 2, y], radius=max(1, int(h * 0.2)), fill=c8(rng.integers(0, 255, 3)))
            for wx in (x - w * 0.3, x + w * 0.3):
                d.ellipse([wx - h * 0.2, y - h * 0.2, wx + h * 0.2, y + h * 0.2], fill=(20, 20, 20))
        else:  # a pole with a sign, or a tourist's thumb
            d.rectangle([x - out * 0.012, out * rng.uniform(0.1, 0.5), x + out * 0.012, out], fill=(60, 60, 65))
            y = out * rng.uniform(0.1, 0.4)
            d.rectangle([x - s * 0.15, y, x + s * 0.15, y + s * 0.12], fill=c8(rng.integers(0, 255, 3)))


def photograph(scene: Image.Image, centre: tuple, rng: np.random.Generator, out: int, *, mild: bool = False) -> Image.Image:
    """Frames the scene (scale, crop, rotation, perspective), then light, occluders and noise."""
    C = scene.width
    pad = C // 4
    arr = np.pad(np.asarray(scene), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    big = Image.fromarray(arr)
    s = rng.uniform(0.8, 1.2) if mild else rng.uniform(0.5, 1.5)
    w = C * 0.46 / s
    shift = 0.08 if mild else 0.25
    cx = centre[0] + pad + rng.uniform(-shift, shift) * w
    cy = centre[1] + pad + rng.uniform(-shift, shift) * w - 0.05 * w
    theta = math.radians(rng.uniform(-5, 5) if mild else rng.uniform(-15, 15))
    persp = 0.03 if mild else 0.1
    corners = []
    for ux, uy in ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)):
        px = ux * w + rng.uniform(-persp, persp) * w
        py = uy * w + rng.uniform(-persp, persp) * w
        corners.append((cx + px * math.cos(theta) - py * math.sin(theta), cy + px * math.sin(theta) + py * math.cos(theta)))
    coeffs = _homography([(0, 0), (out, 0), (out, out), (0, out)], corners)
    img = big.transform((out, out), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR)
    n_occ = 0 if mild else int(rng.choice([0, 0, 1, 1, 2, 3, 4]))
    if n_occ:
        _occluders(SafeDraw(img), rng, out, n_occ)
    x = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.85, 1.15) if mild else rng.uniform(0.55, 1.35)
    cast = rng.uniform(0.92, 1.08, 3) if mild else rng.uniform(0.8, 1.2, 3)
    x = x * gain * cast
    if not mild and rng.random() < 0.5:  # uneven light: a gradient across the frame
        g = np.linspace(rng.uniform(0.7, 1.0), rng.uniform(1.0, 1.3), out, dtype=np.float32)
        x = x * (g[None, :, None] if rng.random() < 0.5 else g[:, None, None])
    gamma = rng.uniform(0.75, 1.3)
    x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** gamma
    x += rng.normal(0, rng.uniform(1, 8 if not mild else 3), x.shape).astype(np.float32)
    img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return img
