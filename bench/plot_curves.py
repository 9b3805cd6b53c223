"""A picture of val PSNR against training seconds from `bench/val_curve.py --json_out` files (or
`bench/train_speed.py --history_out` ones, fields for variants): one panel per file (a preset), one colour per
variant; the solid line is the held-out val pixels, the dotted one the pixels training fits (val_curve.py's
files), so the gap between them shows at a glance.

    python bench/plot_curves.py --curves oblique.json city.json --titles oblique city --output docs/val_curves.png

Drawn with OpenCV (a dependency already), no plotting library.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np

# Variant colours (BGR), Tableau's categorical palette as the viewer's cells.
COLOURS = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140)]
PANEL = (640, 420)  # width, height of one panel in pixels
MARGIN = (70, 40, 20, 50)  # left, top, right, bottom: room for the axes' labels
FONT = cv2.FONT_HERSHEY_SIMPLEX


def nice_ticks(lo: float, hi: float, count: int = 8) -> list[float]:
    """About `count` round values spanning [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [step * k for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def dotted(image: np.ndarray, points: np.ndarray, colour: tuple[int, int, int]) -> None:
    """A dotted polyline through points (P, 2) (pixels): a dot every 6 pixels along it."""
    for a, b in zip(points[:-1], points[1:], strict=False):
        length = float(np.hypot(*(b - a)))
        for f in np.arange(0.0, 1.0, 6.0 / max(length, 1e-6)):
            x, y = a + f * (b - a)
            cv2.circle(image, (int(round(x)), int(round(y))), 1, colour, -1, cv2.LINE_AA)


def series(result: dict) -> np.ndarray:
    """One variant's rows (seconds, val PSNR, fitted pixels' PSNR or nan), from val_curve's "curve" rows (step,
    seconds, val, nearest, fitted) or train_speed's "history" rows (seconds, val)."""
    if "curve" in result:
        return np.array(result["curve"], dtype=np.float64)[:, [1, 2, 4]]
    history = np.array(result["history"], dtype=np.float64)
    return np.concatenate([history, np.full((len(history), 1), np.nan)], 1)


def panel(results: dict[str, dict], title: str) -> np.ndarray:
    """One preset's curves (variant -> val_curve's or train_speed's result)."""
    W, H = PANEL
    left, top, right, bottom = MARGIN
    image = np.full((H, W, 3), 255, np.uint8)
    curves = {name: series(r) for name, r in results.items()}
    seconds = np.concatenate([c[:, 0] for c in curves.values()])
    psnr = np.concatenate([c[:, 1:].ravel() for c in curves.values()])
    psnr = psnr[np.isfinite(psnr)]
    x_hi, y_lo, y_hi = float(seconds.max()) * 1.05, math.floor(psnr.min()) - 0.5, math.ceil(psnr.max()) + 0.5

    def to_pixel(s: np.ndarray, p: np.ndarray) -> np.ndarray:
        x = left + s / x_hi * (W - left - right)
        y = top + (y_hi - p) / (y_hi - y_lo) * (H - top - bottom)
        return np.stack([x, y], -1)

    for value in nice_ticks(y_lo, y_hi):  # horizontal grid lines, labelled in dB
        (_, y), = to_pixel(np.array([0.0]), np.array([value]))
        cv2.line(image, (left, int(y)), (W - right, int(y)), (225, 225, 225), 1)
        cv2.putText(image, f"{value:g}", (8, int(y) + 4), FONT, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    for value in nice_ticks(0.0, x_hi):  # seconds along the bottom
        (x, _), = to_pixel(np.array([value]), np.array([y_lo]))
        cv2.line(image, (int(x), H - bottom), (int(x), H - bottom + 4), (60, 60, 60), 1)
        cv2.putText(image, f"{value:g}", (int(x) - 8, H - bottom + 18), FONT, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.rectangle(image, (left, top), (W - right, H - bottom), (60, 60, 60), 1)
    cv2.putText(image, "training seconds", (W // 2 - 60, H - 10), FONT, 0.45, (30, 30, 30), 1, cv2.LINE_AA)
    fitted = all(np.isfinite(c[:, 2]).all() for c in curves.values())
    legend = "val PSNR dB (solid), trained pixels (dotted)" if fitted else "val PSNR dB"
    cv2.putText(image, f"{title}: {legend}", (left, 25), FONT, 0.5, (30, 30, 30), 1, cv2.LINE_AA)
    for i, (name, curve) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        held_out = to_pixel(curve[:, 0], curve[:, 1])
        cv2.polylines(image, [held_out.round().astype(np.int32)], False, colour, 2, cv2.LINE_AA)
        if np.isfinite(curve[:, 2]).all():
            dotted(image, to_pixel(curve[:, 0], curve[:, 2]), colour)
        cv2.putText(image, name, (W - right - 130, H - bottom - 12 - 18 * i), FONT, 0.45, colour, 1, cv2.LINE_AA)
    return image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curves", type=Path, nargs="+", required=True,
                   help="val_curve.py --json_out or train_speed.py --history_out files")
    p.add_argument("--titles", nargs="+", default=None, help="one per file (default: the file names)")
    p.add_argument("--output", type=Path, required=True, help="PNG to write")
    args = p.parse_args()
    titles = args.titles or [path.stem for path in args.curves]
    if len(titles) != len(args.curves):
        raise SystemExit(f"error: {len(titles)} --titles for {len(args.curves)} --curves")
    for path in args.curves:
        if not path.is_file():
            raise SystemExit(f"error: --curves: {path} is not a file")
    panels = [panel(json.loads(path.read_text()), title) for path, title in zip(args.curves, titles, strict=True)]
    if not cv2.imwrite(str(args.output), np.concatenate(panels, 1)):
        raise SystemExit(f"error: could not write {args.output}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
