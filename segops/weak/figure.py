"""Comparison figures: a grid of image cells with a label above every column and a class-colour legend."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["label_grid", "legend_entries"]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def legend_entries(class_names: Sequence[str], palette: np.ndarray, unlabelled: bool = True) -> List[Tuple[str, Tuple[int, int, int]]]:
    """``(name, rgb)`` per class (palette row = class id), plus ``unlabelled`` (id 255) when asked."""
    out = [(str(n), tuple(int(v) for v in palette[i])) for i, n in enumerate(class_names)]
    if unlabelled:
        out.append(("unlabelled", tuple(int(v) for v in palette[255])))
    return out  # type: ignore[return-value]


def label_grid(
    rows: Sequence[Sequence[np.ndarray]],
    column_labels: Sequence[str],
    legend: Optional[Sequence[Tuple[str, Tuple[int, int, int]]]] = None,
    scale: int = 3,
    gap: int = 4,
    font_size: int = 14,
    title: Optional[str] = None,
) -> "PIL.Image.Image":  # type: ignore[name-defined]  # noqa: F821
    """One figure: ``rows`` of equally sized ``(H, W, 3) uint8`` cells, each magnified ``scale`` times
    (nearest), a label centred above every column, an optional title line and an optional legend of coloured
    swatches below. Returns a PIL image."""
    from PIL import Image, ImageDraw

    if not rows or not rows[0]:
        raise ValueError("label_grid: no cells")
    ncol = len(rows[0])
    if any(len(r) != ncol for r in rows) or len(column_labels) != ncol:
        raise ValueError("label_grid: every row needs %d cells and there must be %d column labels" % (ncol, ncol))
    h, w = rows[0][0].shape[:2]
    ch, cw = h * scale, w * scale
    font = _font(font_size)
    line = font_size + 6
    labels = [str(s) for s in column_labels]
    # long labels wrap onto two lines at a '+' or a space when they are wider than the column
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(s: str) -> int:
        box = probe.textbbox((0, 0), s, font=font)
        return box[2] - box[0]

    wrapped: List[List[str]] = []
    for s in labels:
        cuts = [i for i, c in enumerate(s) if c in "+ "]
        if width(s) <= cw or not cuts:
            wrapped.append([s])
            continue
        i = min(cuts, key=lambda i: abs(i - len(s) / 2))  # the break nearest the middle
        wrapped.append([s[: i + 1].rstrip(), s[i + 1 :].lstrip()])
    head = (line if title else 0) + line * max(len(x) for x in wrapped) + gap
    legend_h = (line + 2 * gap) if legend else 0
    W = ncol * cw + (ncol - 1) * gap
    H = head + len(rows) * ch + (len(rows) - 1) * gap + legend_h
    fig = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(fig)
    y0 = 0
    if title:
        d.text((2, 2), title, fill=(0, 0, 0), font=font)
        y0 = line
    for j, parts in enumerate(wrapped):
        for k, s in enumerate(parts):
            d.text((j * (cw + gap) + (cw - width(s)) // 2, y0 + k * line + 2), s, fill=(0, 0, 0), font=font)
    for i, r in enumerate(rows):
        for j, cell in enumerate(r):
            if cell.shape[:2] != (h, w):
                raise ValueError("label_grid: cell (%d, %d) is %s, expected %s" % (i, j, cell.shape[:2], (h, w)))
            im = Image.fromarray(np.ascontiguousarray(cell, dtype=np.uint8)).resize((cw, ch), Image.NEAREST)
            fig.paste(im, (j * (cw + gap), head + i * (ch + gap)))
    if legend:
        x, y = 2, H - legend_h + gap
        for name, rgb in legend:
            d.rectangle([x, y + 2, x + font_size, y + 2 + font_size], fill=tuple(rgb), outline=(0, 0, 0))
            x += font_size + 4
            d.text((x, y + 1), name, fill=(0, 0, 0), font=font)
            x += width(name) + 3 * gap
    return fig
