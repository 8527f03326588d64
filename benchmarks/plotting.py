"""Quality-versus-compute scatter plots (PNG, log x) drawn with PIL, for the benchmarks."""

import dataclasses
import math

import PIL.Image
import PIL.ImageDraw

# Colour of each setting group (the first word of its label).
_COLOURS = {'edm': 'black', 'dg': 'blue', 'diffrs': 'green', 'isir': 'red'}


@dataclasses.dataclass(frozen=True)
class Point:
  """One setting: its label, compute (x > 0), quality (y) and group (colour)."""
  label: str
  x: float
  y: float
  group: str = ''


def scatter_log_x(path: str, points: list[Point], *, xlabel: str, ylabel: str, title: str,
                  size: tuple[int, int] = (1000, 650)) -> None:
  """Writes a labelled scatter plot of ``points`` with a log10 x axis to ``path`` (PNG)."""
  w, h = size
  left, right, top, bottom = 80, 230, 40, 60
  img = PIL.Image.new('RGB', size, 'white')
  draw = PIL.ImageDraw.Draw(img)
  if not points:
    draw.text((left, top), f'{title}: nothing to plot', fill='black')
    img.save(path)
    return
  xs = [math.log10(max(p.x, 1e-12)) for p in points]
  ys = [p.y for p in points]
  x0, x1 = min(xs) - 0.1, max(xs) + 0.1
  y0, y1 = min(0.0, min(ys)), max(ys) * 1.1 if max(ys) > 0 else 1.0
  px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
  py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
  draw.rectangle([left, top, w - right, h - bottom], outline='black')
  for e in range(math.floor(x0), math.ceil(x1) + 1):
    for m in (1, 2, 5):
      v = math.log10(m) + e
      if x0 <= v <= x1:
        draw.line([px(v), h - bottom, px(v), h - bottom + 5], fill='black')
        draw.text((px(v) - 10, h - bottom + 8), f'{m * 10.0 ** e:g}', fill='black')
  for i in range(6):
    v = y0 + i * (y1 - y0) / 5
    draw.line([left - 5, py(v), left, py(v)], fill='black')
    draw.text((5, py(v) - 6), f'{v:.3g}', fill='black')
  draw.text((w // 2 - 80, h - 25), xlabel, fill='black')
  draw.text((left, 8), f'{title}    y: {ylabel}', fill='black')
  for i, (p, x) in enumerate(zip(points, xs)):
    colour = _COLOURS.get(p.group, 'gray')
    cx, cy = px(x), py(p.y)
    draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
    draw.line([cx, cy, w - right + 10, top + 14 * i + 6], fill=(210, 210, 210))
    draw.text((w - right + 14, top + 14 * i), p.label, fill=colour)
  img.save(path)
