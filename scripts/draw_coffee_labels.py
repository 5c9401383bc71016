"""Draws the hand-placed labels of the ``segops segment`` example on scikit-image's ``data.coffee()`` photo,
resized to 481 x 321 (width x height): the user's strokes and the reference mask the result is scored against.

Classes: 0 = table (and everything that is not the cup set), 1 = cup and saucer, 2 = spoon. Every coordinate
below was read off a 4x-magnified, gridded view of the photo: the saucer's rim as a polygon of 33 points, the
cup's rim as an ellipse, the spoon as a polygon (tip and handle) and an ellipse (bowl). The photo itself is
never stored; only these two label PNGs are::

    python scripts/draw_coffee_labels.py docs/img/segment
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

SIZE = (481, 321)  # (width, height), the BSDS photo size
SAUCER = [
    (145, 52), (122, 60), (100, 75), (90, 85), (80, 102), (67, 135), (61, 160), (62, 185), (67, 210), (80, 235),
    (97, 260), (122, 280), (152, 295), (180, 305), (215, 310), (240, 311), (260, 312), (287, 307), (312, 297),
    (335, 282), (355, 262), (370, 240), (380, 215), (384, 187), (382, 160), (375, 135), (365, 112), (350, 95),
    (335, 84), (300, 60), (240, 45), (190, 44),
]  # fmt: skip
CUP_RIM = (232.5, 90.5, 93.5, 76.0)  # centre x, centre y, semi-axes
SPOON = [
    (318, 57), (330, 53), (340, 60), (336, 80), (334, 100), (331, 120), (326, 140), (320, 160), (314, 180),
    (310, 192), (306, 199), (295, 197), (302, 188), (303, 175), (310, 155), (318, 135), (324, 110), (325, 90), (322, 75),
]  # fmt: skip
SPOON_BOWL = (293, 227, 32, 33)
SPOON_NECK = (253, 192, 282, 207)  # bounding box of the bright bend where the handle meets the bowl
#: strokes: (class, width, polyline)
STROKES = [
    (0, 3, [(20, 110), (30, 180), (45, 260)]),
    (0, 3, [(380, 25), (430, 40), (465, 70)]),
    (0, 3, [(405, 240), (440, 280), (470, 300)]),
    (0, 3, [(60, 300), (140, 316)]),
    (0, 3, [(15, 20), (70, 8)]),
    (1, 3, [(100, 200), (150, 250), (220, 285)]),
    (1, 3, [(180, 35), (240, 28), (290, 40)]),
    (1, 3, [(200, 100), (255, 115)]),
    (1, 3, [(350, 140), (362, 210)]),
    (1, 3, [(170, 210), (175, 235)]),
    (2, 3, [(331, 62), (328, 100)]),
    (2, 3, [(280, 215), (300, 240)]),
]


def _ellipse(d: ImageDraw.ImageDraw, cx: float, cy: float, ax: float, ay: float, fill: int) -> None:
    d.ellipse([cx - ax, cy - ay, cx + ax, cy + ay], fill=fill)


def reference_mask() -> np.ndarray:
    """The reference mask, ``(321, 481) uint8`` class ids."""
    im = Image.new("L", SIZE, 0)
    d = ImageDraw.Draw(im)
    d.polygon(SAUCER, fill=1)
    _ellipse(d, *CUP_RIM, fill=1)
    d.polygon(SPOON, fill=2)
    _ellipse(d, *SPOON_BOWL, fill=2)
    d.ellipse(SPOON_NECK, fill=2)
    return np.asarray(im, dtype=np.uint8).copy()


def strokes() -> np.ndarray:
    """The strokes, ``(321, 481) uint8``: class ids on the strokes, 255 elsewhere."""
    im = Image.new("L", SIZE, 255)
    d = ImageDraw.Draw(im)
    for cls, width, pts in STROKES:
        d.line(pts, fill=cls, width=width, joint="curve")
    return np.asarray(im, dtype=np.uint8).copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    ref, st = reference_mask(), strokes()
    bad = (st != 255) & (st != ref)
    if bad.any():
        raise SystemExit("%d stroke pixels disagree with the reference mask" % int(bad.sum()))
    Image.fromarray(ref, mode="L").save(os.path.join(a.out_dir, "coffee_reference.png"))
    Image.fromarray(st, mode="L").save(os.path.join(a.out_dir, "coffee_strokes.png"))
    print("strokes label %.2f%% of the pixels" % (100.0 * (st != 255).mean()))


if __name__ == "__main__":
    main()
