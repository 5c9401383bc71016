"""PNG figures of a run, drawn with Pillow only: labelled prediction panels with a class legend, and the
training-loss / validation-mIoU curves.

Label maps are coloured with the PASCAL VOC palette (:func:`colorize`); the void label 255 is light beige.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["colorize", "labelled_panels", "save_labelled_panels", "training_curves", "save_training_curves"]

VOID_LABEL = 255
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GRID_GREY = (215, 215, 215)
LOSS_COLOUR = (31, 119, 180)
MIOU_COLOUR = (214, 39, 40)
CELL_GAP = 2  # pixels between panel cells
MARGIN = 6

_PALETTE: Optional[np.ndarray] = None


def colorize(labels: np.ndarray) -> np.ndarray:
    """Class indices ``(H, W)`` -> VOC-palette RGB ``(H, W, 3) uint8`` (255 = light grey-beige)."""
    global _PALETTE
    if _PALETTE is None:
        from segops.data.voc import voc_palette

        _PALETTE = voc_palette(256)
    return _PALETTE[np.clip(labels, 0, 255).astype(np.int64)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def labelled_panels(
    rows: Sequence[Sequence[np.ndarray]],
    column_titles: Sequence[str],
    class_names: Sequence[str] = (),
    scale: int = 1,
    font_size: int = 12,
) -> Image.Image:
    """A grid of ``(H, W, 3) uint8`` cells with a title above each column and a class legend below.

    Args:
        rows: one sequence of cells per row, one cell per column (rows may differ in height, cells in width).
        column_titles: one title per column.
        class_names: legend entries; class ``c`` is drawn in the colour :func:`colorize` gives ``c``, followed
            by an "unlabelled" entry for the void label 255. Empty: no legend.
        scale: nearest-neighbour magnification of the cells (text is drawn at its own size).
    """
    if not rows:
        raise ValueError("labelled_panels: no rows to draw")
    n_cols = len(column_titles)
    if any(len(row) != n_cols for row in rows):
        raise ValueError("labelled_panels: every row needs %d cells (one per column title)" % n_cols)
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cells = [[np.repeat(np.repeat(np.asarray(c, np.uint8), scale, 0), scale, 1) for c in row] for row in rows]
    title_sizes = [_text_size(measure, t, font) for t in column_titles]
    col_widths = [max([title_sizes[j][0] + 4] + [row[j].shape[1] for row in cells]) for j in range(n_cols)]
    row_heights = [max(cell.shape[0] for cell in row) for row in cells]
    title_height = max(h for _, h in title_sizes) + 2 * MARGIN
    grid_width = sum(col_widths) + CELL_GAP * (n_cols - 1)

    legend = [(name, tuple(int(v) for v in colorize(np.array([c]))[0])) for c, name in enumerate(class_names)]
    if legend:
        legend.append(("unlabelled", tuple(int(v) for v in colorize(np.array([VOID_LABEL]))[0])))
    swatch = max(_text_size(measure, "Ag", font)[1], 8)
    entry_widths = [swatch + 4 + _text_size(measure, name, font)[0] + 2 * MARGIN for name, _ in legend]
    legend_lines: List[List[int]] = []  # entry indices per legend line, wrapped to the grid width
    line_width = 0
    for i, w in enumerate(entry_widths):
        if not legend_lines or line_width + w > max(grid_width, w):
            legend_lines.append([])
            line_width = 0
        legend_lines[-1].append(i)
        line_width += w
    legend_height = (len(legend_lines) * (swatch + 4) + MARGIN) if legend else 0

    width = grid_width + 2 * MARGIN
    height = title_height + sum(row_heights) + CELL_GAP * (len(rows) - 1) + MARGIN + legend_height
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    x = MARGIN
    for j, title in enumerate(column_titles):
        draw.text((x + (col_widths[j] - title_sizes[j][0]) // 2, MARGIN), title, fill=BLACK, font=font)
        x += col_widths[j] + CELL_GAP
    y = title_height
    for row, row_height in zip(cells, row_heights):
        x = MARGIN
        for j, cell in enumerate(row):
            canvas.paste(Image.fromarray(cell), (x + (col_widths[j] - cell.shape[1]) // 2, y))
            x += col_widths[j] + CELL_GAP
        y += row_height + CELL_GAP
    y += MARGIN
    for line in legend_lines:
        x = MARGIN
        for i in line:
            name, colour = legend[i]
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline=BLACK)
            draw.text((x + swatch + 4, y), name, fill=BLACK, font=font)
            x += entry_widths[i]
        y += swatch + 4
    return canvas


def save_labelled_panels(path: str, rows, column_titles, class_names=(), scale: int = 1) -> None:
    """:func:`labelled_panels` written to ``path`` (PNG)."""
    labelled_panels(rows, column_titles, class_names, scale).save(path)


def _nice_range(values: Sequence[float]) -> Tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:  # a flat (or single-point) curve: give it a band to sit in
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _plot(
    draw: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], xs: Sequence[float], ys: Sequence[float],
    y_range: Tuple[float, float], colour, title: str, font,
) -> None:  # fmt: skip
    """One line plot into ``box`` = (left, top, right, bottom): frame, title, y limits, x limits, the line."""
    left, top, right, bottom = box
    draw.rectangle(box, outline=BLACK)
    draw.text((left, top - 16), title, fill=BLACK, font=font)
    y_lo, y_hi = y_range
    draw.text((left - 4 - _text_size(draw, "%.3g" % y_hi, font)[0], top), "%.3g" % y_hi, fill=BLACK, font=font)
    draw.text((left - 4 - _text_size(draw, "%.3g" % y_lo, font)[0], bottom - 12), "%.3g" % y_lo, fill=BLACK, font=font)
    if not xs:
        draw.text((left + 8, (top + bottom) // 2), "no data", fill=BLACK, font=font)
        return
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    draw.text((left, bottom + 4), "step %d" % round(x_lo), fill=BLACK, font=font)
    label = "step %d" % round(x_hi)
    draw.text((right - _text_size(draw, label, font)[0], bottom + 4), label, fill=BLACK, font=font)
    for frac in (0.25, 0.5, 0.75):
        gy = bottom - frac * (bottom - top)
        draw.line([(left + 1, gy), (right - 1, gy)], fill=GRID_GREY)
    points = [
        (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))
        for x, y in zip(xs, ys)
    ]
    if len(points) > 1:
        draw.line(points, fill=colour, width=2)
    for px, py in points:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)


def training_curves(history: Sequence[Dict[str, object]], size: Tuple[int, int] = (760, 300)) -> Image.Image:
    """Two plots side by side over the optimizer step: the mean training loss of each epoch (left) and the
    validation mIoU of each evaluation (right). ``history`` is :func:`segops.train.train`'s per-epoch rows
    (``step``, ``loss``, ``val_miou`` when evaluated)."""
    width, height = size
    font = _font(12)
    canvas = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(canvas)
    loss_pts = [(float(r["step"]), float(r["loss"])) for r in history if _finite(r.get("loss"))]  # type: ignore[arg-type]
    miou_pts = [(float(r["step"]), float(r["val_miou"])) for r in history if _finite(r.get("val_miou"))]  # type: ignore[arg-type]
    half = width // 2
    left_pad, top_pad, bottom_pad = 56, 28, 24
    loss_box = (left_pad, top_pad, half - 16, height - bottom_pad)
    miou_box = (half + left_pad, top_pad, width - 16, height - bottom_pad)
    loss_range = _nice_range([y for _, y in loss_pts]) if loss_pts else (0.0, 1.0)
    _plot(draw, loss_box, [x for x, _ in loss_pts], [y for _, y in loss_pts], loss_range, LOSS_COLOUR,
          "training loss (epoch mean)", font)  # fmt: skip
    _plot(draw, miou_box, [x for x, _ in miou_pts], [y for _, y in miou_pts], (0.0, 1.0), MIOU_COLOUR,
          "validation mIoU", font)  # fmt: skip
    return canvas


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def save_training_curves(path: str, history: Sequence[Dict[str, object]]) -> None:
    """:func:`training_curves` written to ``path`` (PNG)."""
    training_curves(history).save(path)
