"""The HTML evaluation report: metrics, threshold curves (with and without GPS), class activation maps
and ablations, reported whichever way they go. One self-contained file (inline SVG and PNG)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from shared.model import load_checkpoint

CURVE_W, CURVE_H = 360, 240


def _svg_curve(points: list[tuple[float, float]], x_label: str, y_label: str, marker: tuple[float, float] | None) -> str:
    if not points:
        return "<p>no data</p>"
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    x0, x1 = float(xs.min()), float(xs.max()) or 1.0
    y0, y1 = float(ys.min()), float(ys.max()) or 1.0

    def sx(x: float) -> float:
        return 40 + (x - x0) / max(x1 - x0, 1e-9) * (CURVE_W - 60)

    def sy(y: float) -> float:
        return CURVE_H - 30 - (y - y0) / max(y1 - y0, 1e-9) * (CURVE_H - 50)

    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
    mark = (f'<circle cx="{sx(marker[0]):.1f}" cy="{sy(marker[1]):.1f}" r="5" fill="crimson"/>' if marker else "")
    return (f'<svg width="{CURVE_W}" height="{CURVE_H}" style="background:#fafafa;border:1px solid #ddd">'
            f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{path}"/>{mark}'
            f'<text x="{CURVE_W / 2}" y="{CURVE_H - 8}" font-size="11" text-anchor="middle">{html.escape(x_label)} '
            f'({x0:.3f} … {x1:.3f})</text>'
            f'<text x="12" y="14" font-size="11">{html.escape(y_label)} ({y0:.3f} … {y1:.3f})</text></svg>')


def _curves(build: dict) -> str:
    curves = build.get("curves", {})
    no_gps = curves.get("no_gps", [])
    geo = curves.get("geo", [])
    cal = build.get("calibration", {})
    parts = ["<h2>Threshold curves (validation split)</h2><div style='display:flex;gap:24px;flex-wrap:wrap'>"]
    # Each point: (t_global, t_ref, landmark accuracy (tags exactly the landmark), non-landmark accuracy)
    parts.append("<div><h3>Without GPS: landmark vs non-landmark accuracy</h3>"
                 + _svg_curve(sorted((p[3], p[2]) for p in no_gps), "non-landmark accuracy", "landmark accuracy", None)
                 + f"<p>chosen t_global {cal.get('t_global', float('nan')):.4f}, t_ref {cal.get('t_ref', float('nan')):.4f}</p></div>")
    parts.append("<div><h3>With GPS: landmark vs non-landmark accuracy over t_geo</h3>"
                 + _svg_curve(sorted((p[2], p[1]) for p in geo), "non-landmark accuracy", "landmark accuracy", None)
                 + f"<p>chosen t_geo {cal.get('t_geo', float('nan')):.4f}</p></div></div>")
    return "".join(parts)


def _cams(world: Path, model: Path, n: int = 8) -> str:
    from shared.cam import class_activation_map, overlay_png
    from shared.errors import DecodeError
    from shared.imaging import decode_image
    from shared.training.dataset import load_dataset

    net, meta, _ = load_checkpoint(model)
    tests = [r for r in load_dataset(world).test if r.landmark_id is not None]
    cells = []
    for record in tests:
        if len(cells) == n:
            break
        try:
            pixels = decode_image(record.path.read_bytes(), size=meta.input_size, max_pixels=50_000_000).pixels
        except (DecodeError, OSError):
            continue  # the evaluation skipped it too (and logged it); the next readable photo takes its place
        cam = class_activation_map(net, pixels, meta.mean, meta.std)
        png = base64.b64encode(overlay_png(pixels, cam)).decode()
        raw = base64.b64encode(_png(pixels)).decode()
        cells.append(f"<figure><img src='data:image/png;base64,{raw}' width=128>"
                     f"<img src='data:image/png;base64,{png}' width=128>"
                     f"<figcaption>landmark {record.landmark_id}</figcaption></figure>")
    return "<h2>Class activation maps (test photos)</h2><div style='display:flex;flex-wrap:wrap;gap:8px'>" + "".join(cells) + "</div>"


def _png(pixels: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _table(rows: dict[str, dict]) -> str:
    keys = ["landmark_accuracy", "landmark_top1_accuracy", "non_landmark_accuracy", "gps_landmark_accuracy", "no_gps_landmark_accuracy",
            "frequent_accuracy", "rare_accuracy", "closed_set_accuracy"]
    head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys)
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(
        f"<td>{m.get(k):.3f}</td>" if isinstance(m.get(k), float) else "<td>–</td>" for k in keys) + "</tr>"
        for name, m in rows.items())
    return f"<table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th></th>{head}</tr>{body}</table>"


def write_report(path: Path, world: Path, model: Path, metrics: dict, ablations: dict[str, dict] | None = None) -> None:
    _, meta, _ = load_checkpoint(model)
    build = meta.extra.get("build", {})
    sections = [f"<h1>Landmark recognition: model {html.escape(meta.version)}</h1>",
                f"<p>world {html.escape(str(world))}; backbone {meta.backbone}, embedding {meta.embedding_dim}, "
                f"input {meta.input_size}px</p>",
                "<h2>Metrics (test split)</h2>", _table({"this model": metrics, **(ablations or {})}),
                "<p>Ablations are listed whichever way they go; a row is a separately built or re-decided "
                "variant of this model on the same test split.</p>",
                _curves(build), _cams(world, model),
                "<h2>Build</h2><pre>" + html.escape(json.dumps({k: v for k, v in build.items() if k != "curves"},
                                                               indent=1)[:20000]) + "</pre>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("<!doctype html><meta charset=utf-8><title>landmarks eval</title>"
                    "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>" + "".join(sections))
