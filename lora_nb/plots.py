"""Matplotlib figures of the course: loss curves, LR schedules, tag frequencies.

Functions return figures; showing them (inline, saved) is the caller's job.
"""

from __future__ import annotations

import numpy as np

from lora_nb.sampling import make_grid


def _figure(width=7.5, height=3.6):
    """A figure outside pyplot's global state (nothing to close, works headless)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def png_bytes(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (a Figure made without pyplot has no inline formatter in Jupyter)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (what TensorBoard's slider does)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_loss(records: list[dict], title: str = "Training loss", smoothing: float = 0.9):
    """Raw and smoothed step loss, plus the fixed-noise validation loss per epoch when present."""
    fig, ax = _figure()
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    if steps:
        ax.plot(steps, losses, color="#9ecae1", lw=0.8, label="loss per step (noisy: random timesteps)")
        ax.plot(steps, smooth(losses, smoothing), color="#08519c", lw=2, label=f"smoothed ({smoothing})")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", color="#d94801", lw=2, label="validation loss (fixed noise)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if steps or val:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_lr_schedule(curve: list[list[float]], labels: list[str], title: str):
    fig, ax = _figure(height=3.0)
    arr = np.array(curve) if curve else np.zeros((0, len(labels)))
    for i, label in enumerate(labels):
        ax.plot(range(1, len(arr) + 1), arr[:, i], lw=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    return fig


def plot_bars(counts: dict[str, float], title: str, xlabel: str = "count", top: int = 25, marks: dict | None = None):
    """Horizontal bars, largest first (tag frequencies, per-image scores …)."""
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    fig, ax = _figure(height=max(2.0, 0.28 * len(items) + 1))
    names = [k for k, _ in items][::-1]
    ax.barh(names, [v for _, v in items][::-1], color="#6baed6")
    for x, label in (marks or {}).items():
        ax.axvline(x, color="#d94801", ls="--", lw=1)
        ax.text(x, len(names) - 0.5, f" {label}", color="#d94801", fontsize=8, va="top")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_lines(x: list, series: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
               vline: float | None = None, vlabel: str = ""):
    fig, ax = _figure(height=3.2)
    for label, ys in series.items():
        ax.plot(x, ys, "o-", lw=2, ms=4, label=label)
    if vline is not None:
        ax.axvline(vline, color="#d94801", ls="--", lw=1)
        ax.text(vline, ax.get_ylim()[1], f" {vlabel}", color="#d94801", fontsize=8, va="top")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


class LivePlot:
    """A loss plot that redraws in place while training runs (in Jupyter), at most every ``every`` steps."""

    def __init__(self, every: int = 5, title: str = "Training loss"):
        self.records: list[dict] = []
        self.every = every
        self.title = title
        self._handle = None

    def __call__(self, event) -> None:
        if event.kind == "step":
            self.records.append(event.data)
            if event.step % self.every == 0:
                self.redraw()
        elif event.kind == "epoch":
            self.records.append(event.data)
            self.redraw()

    def redraw(self) -> None:
        from IPython.display import Image, display

        png = Image(data=png_bytes(plot_loss(self.records, self.title)))
        if self._handle is None:
            self._handle = display(png, display_id=True)
        else:
            self._handle.update(png)

    def figure(self):
        return plot_loss(self.records, self.title)


class TrainingMonitor(LivePlot):
    """What notebook 05 shows while training: the live loss plot, each epoch's sample previews (enlarged
    ``scale`` times; ``samples=False`` leaves them to the grid shown after training), saved files."""

    def __init__(self, every: int = 5, title: str = "Training loss", samples: bool = True, scale: int = 3):
        super().__init__(every, title)
        self.samples, self.scale = samples, scale

    def __call__(self, event) -> None:
        super().__call__(event)
        if event.kind == "sample" and self.samples:
            from IPython.display import display
            from PIL import Image

            images = [Image.open(p).convert("RGB") for p in event.data["paths"]]
            images = [im.resize((im.width * self.scale, im.height * self.scale), Image.NEAREST) for im in images]
            display(make_grid(images, 1, len(images), row_labels=[f"epoch {event.epoch}"]))
        elif event.kind == "save":
            print(f"saved {event.data['path']}")
        elif event.kind == "warning":
            print(f"warning: {event.data['message']}")


def text_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".3g", max_width: int = 48) -> str:
    """A plain-text table of ``rows`` (dicts), for notebooks without pandas: one header line, one line per row; a
    cell longer than ``max_width`` wraps onto continuation lines of its column (never cut)."""
    import textwrap

    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(v) -> list[str]:
        if isinstance(v, float):
            s = format(v, floatfmt)
        elif isinstance(v, (list, tuple)):
            s = "; ".join(str(x) for x in v)
        else:
            s = "" if v is None else str(v)
        return textwrap.wrap(s, max_width) or [""] if len(s) > max_width else [s]

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line) for b in body for line in b[i])) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    for b in body:
        for k in range(max(len(parts) for parts in b)):
            lines.append("  ".join((parts[k] if k < len(parts) else "").ljust(w) for parts, w in zip(b, widths)).rstrip())
    return "\n".join(lines)


def plot_precision_recall(sweeps: dict[str, list[dict]], mark: float | None = 0.6, title: str = ""):
    """Precision (solid) and recall (dashed) against the threshold, one colour per tagger; ``mark`` as a line."""
    fig, ax = _figure(height=3.4)
    colours = ["#08519c", "#d94801", "#238b45", "#6a51a3"]
    for i, (name, rows) in enumerate(sweeps.items()):
        th = [r["threshold"] for r in rows]
        c = colours[i % len(colours)]
        ax.plot(th, [r["precision"] for r in rows], "-", color=c, lw=2, label=f"{name}: precision")
        ax.plot(th, [r["recall"] for r in rows], "--", color=c, lw=2, label=f"{name}: recall")
    if mark is not None:
        ax.axvline(mark, color="#444444", ls=":", lw=1.5)
        ax.text(mark, 0.02, f" {mark:g} (recommended)", fontsize=8, color="#444444")
    ax.set_xlabel("threshold (keep tags with confidence ≥ threshold)")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "Tagging threshold: precision vs recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left", bbox_to_anchor=(0.0, 0.1))
    fig.tight_layout()
    return fig


def plot_grouped_bars(groups: list[str], series: dict[str, list[float]], title: str, ylabel: str,
                      percent: bool = True):
    """Vertical bars, one group per entry of ``groups`` and one bar per series (e.g. center vs focus per set)."""
    fig, ax = _figure(height=3.2)
    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, ys) in enumerate(series.items()):
        bars = ax.bar(x + (i - (n - 1) / 2) * width, ys, width, label=label)
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.0%}" if percent else f"{y:.3g}", ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylabel(ylabel)
    if percent:
        ax.set_ylim(0, 1.12)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
