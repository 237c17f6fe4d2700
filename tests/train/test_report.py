"""`berttrain report`: one self-contained HTML page whose charts hold every logged point, sample predictions of the
latest checkpoint, a PNG with matplotlib, and a clear message without it."""

import json
import math
import re
import sys
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from prep.errors import BertError
from train.report import charts, nice_ticks, read_metrics, svg_chart, write_report

SVG = "{http://www.w3.org/2000/svg}"




def _svgs(page: str) -> dict[str, ET.Element]:
    """Every inline SVG of the page, parsed (so well-formed), by its title."""
    found = {}
    for text in re.findall(r"<svg.*?</svg>", page, re.S):
        svg = ET.fromstring(text)
        found[svg.get("aria-label")] = svg
    return found


def test_html_report_charts_every_logged_point(pretrained_run, cli):
    """The page holds the loss, accuracy, learning-rate, throughput and data-wait charts as inline SVG, each curve
    with exactly the points metrics.jsonl logged, plus the summary and sample predictions; it loads nothing from
    elsewhere, so it can be mailed or archived as one file."""
    result = CliRunner().invoke(cli, ["report", "--run", str(pretrained_run), "--samples", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    path = pretrained_run / "report.html"
    assert result.stdout == f"wrote {path}\n"
    page = path.read_text()
    records = [json.loads(line) for line in (pretrained_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    val = [r for r in records if r.get("split") == "val"]
    svgs = _svgs(page)
    assert set(svgs) == {"Loss (nats per masked token)", "Validation masked-token accuracy", "Learning rate",
                         "Throughput", "Share of step time waiting for data", "Gradient norm (before clipping)"}

    def curve(chart, name):
        for line in svgs[chart].iter(SVG + "polyline"):
            if line.find(SVG + "title").text == name:
                return [tuple(map(float, p.split(","))) for p in line.get("points").split()]
        raise AssertionError(f"no curve {name!r} in {chart!r}")

    assert len(curve("Loss (nats per masked token)", "train loss")) == len(train) == 12
    assert len(curve("Loss (nats per masked token)", "validation MLM loss")) == len(val) == 3
    assert len(curve("Validation masked-token accuracy", "MLM accuracy")) == len(val)
    lr = curve("Learning rate", "lr")
    assert len(lr) == len(train)
    assert lr[0][0] < lr[-1][0]  # steps run left to right
    assert min(y for _, y in lr) < lr[-1][1]  # the peak is drawn higher (smaller y) than the decayed end
    hover = [c.find(SVG + "title").text for c in svgs["Validation masked-token accuracy"].iter(SVG + "circle")]
    assert f"MLM accuracy at step 120: {val[-1]['mlm_acc']:.4g}" in hover
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "Sample predictions" in page and page.count("<tr><td class='n'>") == 3
    assert "checkpoint " + str(pretrained_run / "checkpoints" / "step-00000120") in page
    assert "tokens/s</td><td>median " in page and "data wait</td><td>mean " in page


def test_report_without_shards_still_shows_the_curves(pretrained_run, tmp_path):
    """A run whose checkpoints are gone still gets its charts; the sample table says why it is missing."""
    run_dir = tmp_path / "metrics-only"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text((pretrained_run / "metrics.jsonl").read_text())
    page = write_report(run_dir).read_text()
    assert len(_svgs(page)) == 6
    assert "No sample predictions: --run " in page and "has no complete checkpoint" in page


def test_a_half_written_last_line_is_skipped(pretrained_run, tmp_path):
    """A run still going may have a last line half written: the report reads the rest; damage elsewhere is an
    error that says so."""
    lines = (pretrained_run / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 130, "lo')
    train, val = read_metrics(tmp_path)
    assert len(train) + len(val) == len(lines)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n' + "\n".join(lines))
    with pytest.raises(BertError, match=r"metrics.jsonl:1 is not JSON: the metrics file is damaged"):
        read_metrics(tmp_path)


def test_a_skipped_step_breaks_the_line(pretrained_run):
    """A non-finite loss is logged as null: the loss curve is drawn in two pieces around it, not through zero."""
    train, val = read_metrics(pretrained_run)
    train[5]["loss"] = None
    svg = ET.fromstring(svg_chart(charts(train, val)[0]))
    pieces = [line for line in svg.iter(SVG + "polyline") if line.find(SVG + "title").text == "train loss"]
    assert [len(line.get("points").split()) for line in pieces] == [5, len(train) - 6]


def test_png_needs_matplotlib_and_says_how_to_get_it(pretrained_run, tmp_path, monkeypatch, cli):
    """Without matplotlib, --png fails in one line that names the install command and the HTML alternative."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = CliRunner().invoke(cli, ["report", "--run", str(pretrained_run), "--png", "--out",
                                      str(tmp_path / "r.png")])
    assert result.exit_code == 1
    assert result.output == ("Error: --png needs matplotlib, which is not installed: pip install matplotlib (the "
                             "HTML report, without --png, needs nothing)\n")


def test_png_report_with_matplotlib(pretrained_run, tmp_path):
    """With matplotlib installed, --png writes one PNG image of the same charts."""
    pytest.importorskip("matplotlib")
    path = write_report(pretrained_run, tmp_path / "report.png", png=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ticks_are_round_and_cover_the_range():
    """Axis ticks are 1, 2 or 5 times a power of ten apart and span every value."""
    for low, high in [(0.0537, 0.113), (1, 2000), (6.2, 8.4), (3.4e-5, 1e-3), (5.0, 5.0), (-1.5, 2.5)]:
        ticks = nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6, (low, high, ticks)
        assert 2 <= len(ticks) <= 8


def test_missing_metrics_is_a_one_line_error(tmp_path, cli):
    """A directory that is no run is refused with what is missing."""
    result = CliRunner().invoke(cli, ["report", "--run", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {tmp_path} has no metrics.jsonl: it is not a berttrain run, or it has not "
                             f"logged yet\n")
