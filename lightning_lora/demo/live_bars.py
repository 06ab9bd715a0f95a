"""Mistakes per digit as bars, drawn with Pillow in about a millisecond: the picture of every validation.

The demo validates ten times in a five-second fine-tune; matplotlib would take ~100 ms a
picture and ~0.5 s to import, a third of the run. Pillow (torchvision's own dependency) draws
the same bars (adapter off beside adapter on, counts above them) fast enough to log one at every
validation. ``test`` keeps matplotlib's figures (:mod:`.digit_metrics`): it runs once.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OFF_COLOUR, ON_COLOUR = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue and tab:orange, as at test
WIDTH, HEIGHT = 520, 260
LEFT, RIGHT, TOP, BOTTOM = 16, 8, 44, 34


def mistakes_bars(wrong_on: list[float], wrong_off: list[float] | None, title: str) -> np.ndarray:
    """An RGB array (H, W, 3): per digit, the adapter-off bar (if given) beside the adapter-on one."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=12), ImageFont.load_default(size=9)
    series = [("adapter on" if wrong_off is not None else "mistakes", wrong_on, ON_COLOUR)]
    if wrong_off is not None:
        series.insert(0, ("adapter off (base)", wrong_off, OFF_COLOUR))
    draw.text((LEFT, 6), title, fill="black", font=font)
    x = LEFT
    for label, _, colour in series:  # the legend, on one line under the title
        draw.rectangle((x, 26, x + 10, 36), fill=colour)
        draw.text((x + 14, 25), label, fill="black", font=font)
        x += 24 + int(draw.textlength(label, font=font))
    digits = len(wrong_on)
    peak = max([1.0, *wrong_on, *(wrong_off or [])])
    floor, plot_height = HEIGHT - BOTTOM, HEIGHT - BOTTOM - TOP - 12
    group = (WIDTH - LEFT - RIGHT) / digits
    bar = group * 0.8 / len(series)
    draw.line((LEFT, floor, WIDTH - RIGHT, floor), fill="black")
    for digit in range(digits):
        start = LEFT + digit * group + group * 0.1
        for i, (_, values, colour) in enumerate(series):
            left, height = start + i * bar, round(values[digit] / peak * plot_height)
            draw.rectangle((left, floor - height, left + bar - 2, floor), fill=colour)
            count = str(int(values[digit]))
            width = draw.textlength(count, font=small)
            draw.text((left + (bar - 2 - width) / 2, floor - height - 11), count, fill="black", font=small)
        centre = LEFT + (digit + 0.5) * group
        draw.text((centre - 3, floor + 4), str(digit), fill="black", font=font)
    axis = "true digit"
    draw.text(((WIDTH - draw.textlength(axis, font=font)) / 2, floor + 18), axis, fill="black", font=font)
    return np.asarray(image)
