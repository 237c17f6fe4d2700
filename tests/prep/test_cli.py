"""The bertprep command line: the default flow, and one clear line for every bad input."""

import json
import shutil

from click.testing import CliRunner

from prep.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback, nothing on stdout."""
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or (lines[0].startswith("Usage:") and lines[-1].startswith("Error:")), result.stderr
    assert "Traceback" not in result.stderr and result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_vocab_then_shard_with_defaults(tmp_path, wiki_valid, monkeypatch):
    """`bertprep vocab -i wiki.valid.tokens` then `bertprep shard --max-len 128 --seed 123` just works: the corpus
    comes from the vocab's record and the output is data/wiki_128; a second shard without --force is refused."""
    corpus = tmp_path / "wiki.valid.tokens"
    shutil.copyfile(wiki_valid, corpus)
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["vocab", "-i", str(corpus), "--vocab-size", "3000", "--threads", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["shard", "--max-len", "128", "--seed", "123", "--quiet", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote data/wiki_128" in result.output and "train" in result.output
    again = runner.invoke(main, ["shard", "--max-len", "128", "--seed", "123", "--quiet", "--workers", "1"])
    assert_one_line_error(again, "already exists", "--force")
    assert runner.invoke(main, ["verify", "data/wiki_128"]).exit_code == 0


def test_peek_rows_json_and_stats(wiki_shards):
    """peek prints rows as Input/Target Tokens with [MASK] visible, --json gives the same rows as data, and --stats
    reports the measured 80/10/10 split."""
    result = run("peek", wiki_shards, "-n", "2", "--no-color")
    assert result.exit_code == 0 and result.output.count("Input Tokens:  [CLS]|") == 2
    assert "[MASK]" in result.output and "Target Tokens: [CLS]|" in result.output
    rows = json.loads(run("peek", wiki_shards, "--split", "val", "--row", "5", "-n", "1", "--json").output)
    assert rows[0]["row"] == 5 and len(rows[0]["input_tokens"]) == len(rows[0]["target_tokens"]) == 64
    masked = rows[0]["masked_positions"]
    assert masked and all(rows[0]["target_tokens"][p] != "[MASK]" for p in masked)
    assert {p for p, t in enumerate(rows[0]["input_tokens"]) if t == "[MASK]"} <= set(masked)
    stats = json.loads(run("peek", wiki_shards, "--stats", "--json").output)
    assert abs(stats["replaced_by_mask"] - 0.8) < 0.02 and abs(stats["kept"] - 0.1) < 0.02
    assert "masked as       [MASK] 8" in run("peek", wiki_shards, "--stats").output
    colored = run("peek", wiki_shards, "-n", "1", "--color").output
    assert "\x1b[" in colored


def test_verify_reports_a_damaged_file(wiki_shards, tmp_path):
    """verify: exit 0 with 'ok' on a good dataset; exit 1 naming the file whose byte was flipped."""
    assert "ok:" in run("verify", wiki_shards).output
    copy = tmp_path / "copy"
    shutil.copytree(wiki_shards, copy)
    victim = sorted((copy / "val").glob("*-input_ids.npy"))[0]
    data = bytearray(victim.read_bytes())
    data[200] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = run("verify", copy)
    assert result.exit_code == 1
    assert_one_line_error(result, victim.name, "sha256")


def test_bad_inputs_give_one_clear_line(tmp_path, vocab_dir, wiki_valid):
    """Missing or empty input, a missing vocab, --max-len out of range, an existing output, a missing dataset:
    each is one line on stderr and a non-zero exit, and no output directory is left behind."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    out = tmp_path / "out"
    common = ["--vocab", vocab_dir, "-o", out, "--quiet", "--workers", "1"]
    assert_one_line_error(run("shard", "-i", tmp_path / "nope.txt", *common), "input not found", "nope.txt")
    assert_one_line_error(run("shard", "-i", empty, *common), "empty")
    assert_one_line_error(run("shard", "-i", wiki_valid, "--vocab", tmp_path / "novocab", "-o", out),
                          "novocab", "bertprep vocab")
    assert_one_line_error(run("shard", "-i", wiki_valid, *common, "--max-len", "5000"), "--max-len", "4096")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    out.mkdir()
    assert_one_line_error(run("shard", "-i", wiki_valid, *common), "already exists")
    assert_one_line_error(run("peek", tmp_path / "nothing"), "no dataset")
    assert_one_line_error(run("vocab", "-i", tmp_path / "nope.txt", "-o", tmp_path / "v"), "input not found")


def test_invalid_utf8_and_a_huge_line_are_handled_and_reported(tmp_path, vocab_dir):
    """Invalid UTF-8 is replaced and counted, and a single 3-million-character line is cut at whitespace rather than
    held whole; the summary says so and the job succeeds."""
    bad = tmp_path / "bad.txt"
    words = ("alpha beta gamma delta " * 150_000).encode()
    bad.write_bytes(b"caf\xe9 ol\xff\xfe here\n\n" + words + b"\n")
    out = tmp_path / "out"
    result = run("shard", "-i", bad, "--vocab", vocab_dir, "-o", out, "--quiet", "--workers", "1",
                 "--val-fraction", "0")
    assert result.exit_code == 0, result.output
    assert "3 invalid UTF-8 sequences were replaced" in result.output
    assert "long lines split" in result.output
