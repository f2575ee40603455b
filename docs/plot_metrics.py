"""Draw a run's curves from its metrics.jsonl as an SVG, with the standard library only:

    python docs/plot_metrics.py checkpoint-generation/metrics.jsonl docs/first-run.svg

Left: the training loss (each report) and the validation loss (each evaluation) by step.
Right: polarity accuracy by step. TensorBoard shows the same curves live
(`tensorboard --logdir checkpoint-generation`); this picture is for the README.
"""
import json
import math
import sys
from pathlib import Path

# The project's command-line helpers (standard library only), one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from options import ArgumentParser  # noqa: E402
from runtime.errors import InputError, first_line  # noqa: E402

WIDTH, HEIGHT, MARGIN = 360, 240, 44
COLOURS = {"train loss": "#1f77b4", "val loss": "#d62728", "polarity accuracy": "#2ca02c"}
# Each curve: the events it is drawn from and the value it draws.
CURVES = {"train loss": ("train", "loss"), "val loss": ("eval", "val_loss"),
          "polarity accuracy": ("eval", "polarity_accuracy")}


def read_events(path):
    """The curves of a metrics.jsonl, by name: (step, value) pairs. A last line cut short (a
    run killed while writing it) is left out, as a resumed run drops it; any other line
    that is not an event is refused, naming it."""
    events = []
    lines = read_lines(path)
    for number, line in enumerate(lines, start=1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise InputError(f"{path}:{number}: not a JSON event ({e})") from None
        if not (isinstance(event, dict) and isinstance(event.get("step"), int)):
            raise InputError(f"{path}:{number}: not an event of metrics.jsonl (no step)")
        events.append(event)
    series = {name: [(e["step"], e[key]) for e in events
                     if e.get("event") == kind and is_number(e.get(key))]
              for name, (kind, key) in CURVES.items()}
    if not series["train loss"] + series["val loss"]:
        raise InputError(f"{path}: no training or validation loss to draw yet; a run writes "
                         f"them as it trains (every --log_every steps, at each evaluation)")
    return series


def read_lines(path):
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read ({first_line(e)})") from None


def is_number(value):
    """A finite loss or accuracy: a NaN (a run that diverged) cannot be drawn."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def panel(x0, title, curves, y_range=None, legend_below=False):
    """One chart at horizontal offset `x0`: axes, ticks, a polyline per curve, a legend
    (top right, or bottom right for a rising curve)."""
    points = [p for curve in curves.values() for p in curve]
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    x_lo, x_hi = min(steps), max(steps)
    y_lo, y_hi = y_range or (min(values), max(values))
    pad = (y_hi - y_lo) * 0.05 or 1
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def x(step):
        return x0 + MARGIN + (step - x_lo) / max(x_hi - x_lo, 1) * (WIDTH - MARGIN - 10)

    def y(value):
        return HEIGHT - MARGIN + 10 - (value - y_lo) / (y_hi - y_lo) * (HEIGHT - MARGIN - 20)

    parts = [f'<text x="{x0 + WIDTH / 2}" y="14" text-anchor="middle" font-weight="bold">'
             f'{title}</text>',
             f'<rect x="{x0 + MARGIN}" y="{y(y_hi):.1f}" width="{WIDTH - MARGIN - 10}" '
             f'height="{y(y_lo) - y(y_hi):.1f}" fill="none" stroke="#888"/>']
    for i in range(5):
        value = y_lo + pad + (y_hi - y_lo - 2 * pad) * i / 4
        step = x_lo + (x_hi - x_lo) * i / 4
        parts.append(f'<text x="{x0 + MARGIN - 4}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f'{value:.3g}</text>')
        parts.append(f'<text x="{x(step):.1f}" y="{HEIGHT - MARGIN + 26}" text-anchor="middle">'
                     f'{step:.0f}</text>')
    parts.append(f'<text x="{x0 + MARGIN + (WIDTH - MARGIN) / 2}" y="{HEIGHT - 4}" '
                 f'text-anchor="middle">step</text>')
    for i, (name, curve) in enumerate(curves.items()):
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in curve)
        colour = COLOURS[name]
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" '
                     f'stroke-width="1.5"/>')
        parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>'
                  for s, v in curve if len(curve) < 30]
        legend_y = y(y_lo) - 8 - 14 * i if legend_below else y(y_hi) + 16 + 14 * i
        parts.append(f'<text x="{x0 + WIDTH - 14}" y="{legend_y:.1f}" '
                     f'text-anchor="end" fill="{colour}">{name}</text>')
    return parts


def svg(series):
    parts = panel(0, "loss", {k: series[k] for k in ("train loss", "val loss")})
    if series["polarity accuracy"]:
        parts += panel(WIDTH, "polarity accuracy",
                       {"polarity accuracy": series["polarity accuracy"]}, legend_below=True)
    width = 2 * WIDTH if series["polarity accuracy"] else WIDTH
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" '
            f'font-family="sans-serif" font-size="11">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n")


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", help="a run's metrics.jsonl")
    p.add_argument("out", help="the SVG to write")
    a = p.parse_args(argv)
    try:
        picture = svg(read_events(a.metrics))
        try:
            Path(a.out).write_text(picture, encoding="utf-8")
        except OSError as e:
            raise InputError(f"could not write {a.out} ({first_line(e)})") from None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
