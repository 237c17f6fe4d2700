"""`berttrain report`: one page with what a person looks at instead of metrics.jsonl: loss, accuracy and
learning-rate curves over steps, throughput, data wait, and sample predictions of the latest checkpoint.

The HTML report draws its charts as inline SVG and needs nothing beyond the standard library; `--png` draws the
same curves with matplotlib, an optional extra.
"""

from __future__ import annotations

import html
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from prep.errors import BertError
from prep.outputs import write_atomic
from train.predict import PREDICTION_CSS, row_html

METRICS_FILE = "metrics.jsonl"  # as train.rundir names it
CONFIG_FILE = "config.json"
HTML_NAME = "report.html"
PNG_NAME = "report.png"
CHART_WIDTH, CHART_HEIGHT = 520, 230
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 62, 14, 28, 34
LEGEND_WIDTH = 160
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
MATPLOTLIB_HINT = "pip install matplotlib"


@dataclass
class Series:
    """One curve: (step, value) points; None values break the line."""

    name: str
    points: list[tuple[float, float | None]]
    dashed: bool = False
    markers: bool = False
    """Circles with the value on hover at every point (evaluations: few points, each worth reading)."""


@dataclass
class Chart:
    title: str
    series: list[Series] = field(default_factory=list)
    y_label: str = ""
    y_include: tuple[float, ...] = ()
    """Values the y axis always spans: a data wait of 0.01% then reads as the flat line at 0 it is."""

    @property
    def empty(self) -> bool:
        return not any(v is not None for s in self.series for _, v in s.points)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of metrics.jsonl, by step. A half-written last line (the run is
    still going) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise BertError(f"--run {run_dir}: no such run directory")
    if not path.is_file():
        raise BertError(f"{run_dir} has no {METRICS_FILE}: it is not a berttrain run, or it has not logged yet")
    train, val = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue
            raise BertError(f"{path}:{number} is not JSON: the metrics file is damaged") from None
        (val if record.get("split") else train).append(record)
    if not train and not val:
        raise BertError(f"{path} has no records yet: the run has not reached its first --log-every step")
    return train, val


def charts(train: list[dict], val: list[dict]) -> list[Chart]:
    """The report's charts from metrics records (empty ones are dropped)."""

    def points(records, key):
        return [(r["step"], r.get(key)) for r in records if "step" in r]

    loss = Chart("Loss (nats per masked token)", [Series("train loss", points(train, "loss"))], "loss")
    if any("nsp_loss" in r for r in train):
        loss.series.append(Series("train MLM loss", points(train, "mlm_loss")))
    loss.series.append(Series("validation MLM loss", points(val, "mlm_loss"), markers=True))
    if any("unigram_loss" in r for r in val):
        loss.series.append(Series("token frequencies alone", points(val, "unigram_loss"), dashed=True))
    accuracy = Chart("Validation masked-token accuracy",
                     [Series("MLM accuracy", points(val, "mlm_acc"), markers=True)], "accuracy")
    if any("baseline_acc" in r for r in val):
        accuracy.series.append(Series("most frequent token", points(val, "baseline_acc"), dashed=True))
    if any("nsp_acc" in r for r in val):
        accuracy.series.append(Series("NSP accuracy", points(val, "nsp_acc"), markers=True))
    result = [
        loss,
        accuracy,
        Chart("Learning rate", [Series("lr", points(train, "lr"))], "lr"),
        Chart("Throughput", [Series("tokens/s", points(train, "tokens_per_s"))], "tokens/s"),
        Chart("Share of step time waiting for data", [Series("data wait", points(train, "data_wait_frac"))],
              "share", y_include=(0.0, 0.05)),
        Chart("Gradient norm (before clipping)", [Series("grad norm", points(train, "grad_norm"))], "norm"),
    ]
    return [chart for chart in result if not chart.empty]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value < high + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


def format_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10_000:
        return f"{value / 1000:,.0f}k"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.3g}"


def svg_chart(chart: Chart) -> str:
    """A line chart as an inline SVG element: axes with round ticks, one polyline per series, a legend."""
    xs = [x for s in chart.series for x, v in s.points if v is not None]
    ys = [v for s in chart.series for _, v in s.points if v is not None and math.isfinite(v)]
    ys += chart.y_include
    x_ticks = nice_ticks(min(xs), max(xs))
    headroom = 0.06 * len(chart.series) * (max(ys) - min(ys))  # room for the legend above the highest value
    y_ticks = nice_ticks(min(ys), max(ys) + headroom)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = CHART_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def px(x: float) -> float:
        return MARGIN_LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w

    def py(y: float) -> float:
        return MARGIN_TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
           f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" class="chart" role="img" '
           f'aria-label="{html.escape(chart.title)}">',
           f'<text x="{MARGIN_LEFT}" y="16" class="title">{html.escape(chart.title)}</text>']
    for t in y_ticks:
        out.append(f'<line x1="{MARGIN_LEFT}" x2="{CHART_WIDTH - MARGIN_RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                   f'class="grid"/><text x="{MARGIN_LEFT - 6}" y="{py(t) + 4:.1f}" class="tick" '
                   f'text-anchor="end">{format_number(t)}</text>')
    for t in x_ticks:
        out.append(f'<text x="{px(t):.1f}" y="{CHART_HEIGHT - MARGIN_BOTTOM + 16}" class="tick" '
                   f'text-anchor="middle">{format_number(t)}</text>')
    out.append(f'<text x="{CHART_WIDTH - MARGIN_RIGHT}" y="{CHART_HEIGHT - 4}" class="tick" '
               f'text-anchor="end">step</text>')
    legend_x = CHART_WIDTH - MARGIN_RIGHT - LEGEND_WIDTH
    named = sum(any(v is not None for _, v in s.points) for s in chart.series)
    # A translucent box keeps the legend readable where a curve runs under it.
    legend = [f'<rect x="{legend_x - 4}" y="{MARGIN_TOP - 6}" width="{LEGEND_WIDTH + 4}" height="{14 * named + 6}" '
              f'fill="#fff" fill-opacity="0.8"/>']
    legend_y = MARGIN_TOP + 4
    for i, series in enumerate(chart.series):
        color = COLORS[i % len(COLORS)]
        dash = ' stroke-dasharray="5,4"' if series.dashed else ""
        for segment in _segments(series.points):
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in segment)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"{dash}>'
                       f'<title>{html.escape(series.name)}</title></polyline>')
            if series.markers or len(segment) == 1:
                for x, y in segment:
                    out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>'
                               f'{html.escape(series.name)} at step {x:g}: {y:.4g}</title></circle>')
        if not any(v is not None for _, v in series.points):
            continue
        legend.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" '
                      f'stroke-width="2"{dash}/><text x="{legend_x + 22}" y="{legend_y + 4}" class="legend">'
                      f'{html.escape(series.name)}</text>')
        legend_y += 14
    out += legend
    out.append("</svg>")
    return "".join(out)


def _segments(points: list[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Runs of finite values: a None or non-finite value (a skipped step) breaks the line."""
    segments, current = [], []
    for x, y in points:
        if y is None or not math.isfinite(y):
            if current:
                segments.append(current)
            current = []
        else:
            current.append((x, y))
    if current:
        segments.append(current)
    return segments


def summary_rows(run_dir: Path, train: list[dict], val: list[dict]) -> list[tuple[str, str]]:
    """(name, value) lines of the report's summary table."""
    rows = [("run", str(run_dir))]
    config_file = Path(run_dir) / CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    model, plan, dataset = config.get("model", {}), config.get("plan", {}), config.get("dataset", {})
    if model:
        rows.append(("model", f"{model['layers']} layers x {model['hidden']} hidden, {model['heads']} heads, "
                              f"ffn {model['ffn']}, {model['norm']}-LN" + (", NSP head" if model.get("nsp") else "")))
    if dataset:
        rows.append(("data", f"{dataset.get('path')}: rows of {dataset.get('max_len')} tokens"))
    if plan:
        rows.append(("plan", f"{plan['steps']:,} steps of {plan['tokens_per_step']:,} tokens, lr {plan['peak_lr']:g} "
                             f"(warm-up {plan['warmup']:,}, {plan['schedule']} decay to {plan['final_lr']:g})"))
    if "precision" in config:
        rows.append(("device", f"{config.get('world_size', 1)} process(es), {config['precision']}"))
    if train:
        last = train[-1]
        rows.append(("last step", f"{last['step']:,}: loss {_fmt(last.get('loss'))}, lr {_fmt(last.get('lr'))}"))
        speeds = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
        if speeds:
            rows.append(("tokens/s", f"median {statistics.median(speeds):,.0f}, last {speeds[-1]:,.0f}"))
        waits = [r["data_wait_frac"] for r in train if r.get("data_wait_frac") is not None]
        if waits:
            rows.append(("data wait", f"mean {statistics.fmean(waits):.1%} of step time (near 0: the GPU never "
                                      f"waits for batches)"))
        skipped = sum(r.get("skipped", 0) for r in train)
        if skipped:
            rows.append(("skipped steps", f"{skipped} (non-finite loss)"))
    if val:
        best = min((r for r in val if r.get("mlm_loss") is not None), key=lambda r: r["mlm_loss"], default=None)
        last = val[-1]
        line = (f"step {last['step']:,}: MLM loss {_fmt(last.get('mlm_loss'))}, accuracy {_fmt(last.get('mlm_acc'))}")
        if last.get("baseline_acc") is not None:
            line += f" (most frequent token: {_fmt(last['baseline_acc'])})"
        rows.append(("validation", line))
        if best is not None:
            rows.append(("best validation", f"MLM loss {best['mlm_loss']:.4f} at step {best['step']:,}"))
    return rows


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def sample_predictions(run_dir: Path, samples: int, device: str = "cpu") -> tuple[str, str | None]:
    """(HTML table of `samples` validation rows scored by the latest checkpoint, or a note why there is none,
    the checkpoint used)."""
    from prep.shards import open_dataset
    from train.pretrained import load_pretrained
    from train.predict import Predictor

    try:
        pretrained = load_pretrained(Path(run_dir))
        predictor = Predictor.load(pretrained, device)
        if pretrained.shards is None:
            raise BertError(f"{pretrained.source} does not record its shards")
        dataset = open_dataset(pretrained.shards)
        split = dataset.splits.get("val") or dataset.split("train")
        rows = predictor.score_rows(split, 0, min(samples, split.rows))
    except BertError as exc:
        return f'<p class="note">No sample predictions: {html.escape(str(exc))}</p>', None
    body = []
    for i, row in enumerate(rows):
        right = sum(s["correct"] for s in row["slots"])
        body.append(f"<tr><td class='n'>{i}</td><td>{row_html(row, predictor.vocab)}</td>"
                    f"<td class='n'>{right}/{len(row['slots'])}</td></tr>")
    table = (f"<p class='note'>{html.escape(split.name)} rows 0–{len(rows) - 1} of {html.escape(str(dataset.path))}, "
             f"scored by {html.escape(pretrained.source)}. <span class='ok'>green</span>: the model's guess is "
             f"the original token; <span class='bad'>red<span class='truth'>truth</span></span>: its guess, "
             f"the original in brackets; hover for probabilities.</p>"
             f"<table class='samples'><tr><th>#</th><th>text with the model's guesses</th><th>right</th></tr>"
             + "".join(body) + "</table>")
    return table, pretrained.source


REPORT_CSS = PREDICTION_CSS + """
h2 { margin-top: 1.5em; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart { background: #fff; border: 1px solid #eee; }
.chart .title { font: bold 13px system-ui, sans-serif; }
.chart .tick, .chart .legend { font: 11px system-ui, sans-serif; fill: #555; }
.chart .grid { stroke: #eee; }
.summary-table td:first-child { color: #777; }
.samples td { vertical-align: top; border-bottom: 1px solid #f0f0f0; }
.n { color: #999; font-size: 80%; white-space: nowrap; }
.note { color: #555; }
"""


def write_report(run_dir: Path, out: Path | None = None, png: bool = False, samples: int = 8,
                 device: str = "cpu") -> Path:
    """`berttrain report`: RUN/report.html (or report.png with `png`, which needs matplotlib); returns the path.

    The HTML holds a summary table, the charts as inline SVG, and `samples` validation rows with the latest
    checkpoint's predictions (0 for none).
    """
    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    chart_list = charts(train, val)
    if png:
        path = Path(out) if out is not None else run_dir / PNG_NAME
        _write_png(chart_list, path, str(run_dir))
        return path
    path = Path(out) if out is not None else run_dir / HTML_NAME
    summary = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                      for k, v in summary_rows(run_dir, train, val))
    samples_html = sample_predictions(run_dir, samples, device)[0] if samples > 0 else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>berttrain report: {html.escape(str(run_dir))}</title>
<style>{REPORT_CSS}</style></head><body>
<h1>Training report: {html.escape(run_dir.name)}</h1>
<table class="summary-table">{summary}</table>
<h2>Curves</h2>
<div class="charts">{"".join(svg_chart(chart) for chart in chart_list)}</div>
{"<h2>Sample predictions</h2>" + samples_html if samples_html else ""}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, page)
    return path


def _write_png(chart_list: list[Chart], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BertError(f"--png needs matplotlib, which is not installed: {MATPLOTLIB_HINT} (the HTML report, "
                        f"without --png, needs nothing)") from None
    columns = 2
    rows = max(1, math.ceil(len(chart_list) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    for ax, chart in zip(axes.flat, chart_list):
        for i, series in enumerate(chart.series):
            xs = [x for x, _ in series.points]
            ys = [math.nan if y is None else y for _, y in series.points]
            ax.plot(xs, ys, label=series.name, color=COLORS[i % len(COLORS)], linestyle="--" if series.dashed else "-",
                    marker="o" if series.markers else None, markersize=3)
        if chart.y_include:
            low, high = ax.get_ylim()
            ax.set_ylim(min(low, *chart.y_include), max(high, *chart.y_include))
        ax.set_title(chart.title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(chart_list):]:
        ax.axis("off")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    plt.close(figure)
    write_atomic(path, png.getvalue())
