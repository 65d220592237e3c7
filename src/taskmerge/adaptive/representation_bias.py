"""Representation bias, measured and drawn: the mean L1 distance between the merged model's and the
expert's features, after every residual block (token means incl. CLS) and at the final feature,
before and after Surgery / SurgeryV2 (the quantity Surgery minimises, METHODS.md §2.8–2.9).

The figure (Pillow only) has the per-layer curve on the left (mean over tasks, thin lines per task)
and, per task, a 2-D PCA projection of the expert's, the merged and the corrected final features.
"""
from __future__ import annotations

import io
from typing import Mapping

import torch
from PIL import Image, ImageDraw, ImageFont

from taskmerge.storage import atomic

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def mean_l1(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> float:
    """mean |a − b| over all elements, in float32, chunked along the first axis."""
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    total = 0.0
    for s in range(0, len(a), chunk):
        total += (a[s:s + chunk].float() - b[s:s + chunk].float()).abs().sum().item()
    return total / max(a.numel(), 1)


def bias_profile(features: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor]) -> dict:
    """{"blocks": [mean L1 after block 1..L], "final": mean L1 of the final feature}; each input is
    {"blocks": (L, N, w), "final": (N, d)} ("blocks" optional)."""
    out = {"final": mean_l1(features["final"], expert["final"])}
    if "blocks" in features and "blocks" in expert:
        out["blocks"] = [mean_l1(f, e) for f, e in zip(features["blocks"], expert["blocks"])]
    return out


def average_profile(profiles: Mapping[str, dict]) -> dict:
    """The mean over tasks of per-task profiles."""
    ps = list(profiles.values())
    out = {"final": sum(p["final"] for p in ps) / len(ps)}
    if all("blocks" in p for p in ps):
        out["blocks"] = [sum(v) / len(ps) for v in zip(*(p["blocks"] for p in ps))]
    return out


def bias_report(experts: Mapping[str, Mapping[str, torch.Tensor]],
                stages: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]) -> dict:
    """The JSON-report block: `stages` = {stage: {task: features}}, e.g. {"merged": base features,
    "surgery_v1": {"blocks": base blocks, "final": ẑ}, "surgery_v2": result.corrected}; returns
    {"per_task": {stage: {task: profile}}, "average": {stage: profile}} (mean L1 to the expert)."""
    per_task = {stage: {t: bias_profile(f, experts[t]) for t, f in feats.items()}
                for stage, feats in stages.items()}
    return {"per_task": per_task, "average": {stage: average_profile(p) for stage, p in per_task.items()}}


def pca_2d(groups: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Project every group onto the top-2 principal axes of all groups together (exact SVD,
    deterministic; the groups are subsampled to a few hundred points before this)."""
    data = torch.cat([g.float() for g in groups.values()])
    mean = data.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(data - mean, full_matrices=False)
    axes = vh[:2].T
    return {k: (g.float() - mean) @ axes for k, g in groups.items()}


def _subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if len(x) <= n else x[torch.linspace(0, len(x) - 1, n).long()]


def _curve_panel(draw, font, box, profiles: Mapping[str, Mapping[str, dict]], colours) -> None:
    x0, y0, x1, y1 = box
    left, bottom = x0 + 50, y1 - 30
    series = {}
    for label, per_task in profiles.items():
        curves = {t: list(p.get("blocks", [])) + [p["final"]] for t, p in per_task.items()}
        avg = average_profile(per_task)
        series[label] = (curves, list(avg.get("blocks", [])) + [avg["final"]])
    n = max(len(mean) for _, mean in series.values())
    ymax = max(max(max(c) for c in curves.values()) for curves, _ in series.values()) * 1.05 or 1.0
    draw.line([(left, y0 + 20), (left, bottom), (x1 - 10, bottom)], fill="black")
    px = lambda i: left + (x1 - 10 - left) * (i + 0.5) / n
    py = lambda v: bottom - (bottom - y0 - 20) * v / ymax
    for i in range(n):
        draw.text((px(i) - 6, bottom + 5), "F" if i == n - 1 else str(i + 1), fill="black", font=font)
    for k in range(5):
        v = ymax * k / 4
        draw.text((x0 + 2, py(v) - 6), f"{v:.3g}", fill="black", font=font)
    draw.text((left, y0 + 2), "mean L1 to expert, per block (F = final feature)", fill="black", font=font)
    for label, (curves, mean) in series.items():
        colour = colours[label]
        light = tuple(int(c + (255 - c) * 0.65) for c in colour)
        # Right-aligned: the last value is always the final feature, even without block values.
        line = lambda c: [(px(n - len(c) + i), py(v)) for i, v in enumerate(c)]  # noqa: E731
        for c in curves.values():
            if len(c) > 1:
                draw.line(line(c), fill=light, width=1)
        if len(mean) > 1:
            draw.line(line(mean), fill=colour, width=3)
        for x, y in line(mean):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    for j, label in enumerate(series):
        draw.rectangle([x1 - 170, y0 + 20 + 16 * j, x1 - 158, y0 + 30 + 16 * j], fill=colours[label])
        draw.text((x1 - 152, y0 + 18 + 16 * j), label, fill="black", font=font)


def _scatter_panel(draw, font, box, task: str, groups: Mapping[str, torch.Tensor], colours) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="black")
    draw.text((x0 + 4, y0 + 2), task, fill="black", font=font)
    pts = pca_2d(groups)
    allp = torch.cat(list(pts.values()))
    lo, hi = allp.min(dim=0).values, allp.max(dim=0).values
    centre = (lo + hi) / 2
    half = max((hi - lo).max().item() / 2, 1e-12)   # one scale for both axes: distances stay honest
    size = min(x1 - x0 - 16, y1 - y0 - 24) / 2
    cx0, cy0 = (x0 + x1) / 2, (y0 + 16 + y1) / 2
    for label, p in pts.items():
        for x, y in ((p - centre) / half).tolist():
            cx, cy = cx0 + x * size, cy0 - y * size
            draw.ellipse([cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5], fill=colours[label])


def _legend(draw, font, x, y, labels, colours, heading: str = "") -> None:
    if heading:
        draw.text((x, y - 2), heading, fill="black", font=font)
        x += draw.textlength(heading, font=font) + 10
    for label in labels:
        draw.rectangle([x, y, x + 10, y + 10], fill=colours[label])
        draw.text((x + 14, y - 2), label, fill="black", font=font)
        x += 14 + draw.textlength(label, font=font) + 16


def draw_representation_bias(path: str, profiles: Mapping[str, Mapping[str, dict]],
                             projections: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                             title: str = "", max_points: int = 200) -> None:
    """One PNG: `profiles` = {label: {task: bias_profile}} (e.g. "merged", "after surgery");
    `projections` = {task: {label: (N, d) final features}} (e.g. "expert", "merged", "corrected")."""
    font = ImageFont.load_default()
    projections = projections or {}
    labels = list(dict.fromkeys([*profiles, *(k for g in projections.values() for k in g)]))
    colours = {label: PALETTE[j % len(PALETTE)] for j, label in enumerate(labels)}
    cols = 4 if len(projections) > 4 else max(len(projections), 1)
    rows = -(-len(projections) // cols) if projections else 0
    cell = 190
    width = 560 + (cols * cell + 20 if projections else 0)
    height = max(420, 40 + rows * cell + 30)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=font)
    _curve_panel(draw, font, (10, 30, 550, 410), profiles, colours)
    for j, (task, groups) in enumerate(projections.items()):
        groups = {k: _subsample(v, max_points) for k, v in groups.items()}
        x0, y0 = 570 + (j % cols) * cell, 30 + (j // cols) * cell
        _scatter_panel(draw, font, (x0, y0, x0 + cell - 10, y0 + cell - 10), task, groups, colours)
    if projections:
        _legend(draw, font, 570, height - 20, list(dict.fromkeys(k for g in projections.values() for k in g)),
                colours, "final features, 2-D PCA (equal axes):")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic.write_bytes(path, buf.getvalue())
