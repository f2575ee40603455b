"""Draw a run's curves from its metrics.jsonl as an SVG, with the standard library only:

    python docs/plot_metrics.py checkpoint-generation/metrics.jsonl docs/first-run.svg

Left: the training loss (each report) and the validation loss (each evaluation) by step.
Right: polarity accuracy by step. TensorBoard shows the same curves live
(`tensorboard --logdir checkpoint-generation`); this picture is for the README.
"""
import argparse
import json
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 360, 240, 44
COLOURS = {"train loss": "#1f77b4", "val loss": "#d62728", "polarity accuracy": "#2ca02c"}


def read_events(path):
    events = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    series = {"train loss": [(e["step"], e["loss"]) for e in events if e["event"] == "train"],
              "val loss": [(e["step"], e["val_loss"]) for e in events if e["event"] == "eval"],
              "polarity accuracy": [(e["step"], e["polarity_accuracy"]) for e in events
                                    if "polarity_accuracy" in e]}
    return series


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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", help="a run's metrics.jsonl")
    p.add_argument("out", help="the SVG to write")
    a = p.parse_args()
    Path(a.out).write_text(svg(read_events(a.metrics)), encoding="utf-8")
