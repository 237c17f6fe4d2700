"""Before/after check for refactors: shard bytes for 1 and 2 workers, and the losses of short fixed-seed runs.

Run from a checkout: `python bench/equivalence.py OUT.json`; compare two outputs with `diff`. Uses the WikiText-2
validation split beside the checkout (or $BERT_SHARED_DIR).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BERT_SHARED_DIR", ROOT.parent / "shared"))
CORPUS = SHARED / "corpora" / "wikitext-2" / "wiki.valid.tokens"
RUNS = {
    "static-post": ["--size", "tiny", "--masking", "static"],
    "dynamic-pre": ["--size", "tiny", "--masking", "dynamic", "--norm", "pre"],
}


def tree_sha256(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def main(out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, whatever is installed
    prep, train = [sys.executable, "-m", "prep"], [sys.executable, "-m", "train"]
    result: dict = {"shards": {}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([*prep, "vocab", "-i", CORPUS, "-o", tmp / "vocab", "--vocab-size", "4000"],
                       check=True, capture_output=True, env=env, cwd=ROOT)
        for workers in (1, 2):
            out_dir = tmp / f"shards{workers}"
            subprocess.run([*prep, "shard", "-i", CORPUS, "--vocab", tmp / "vocab" / "vocab.txt",
                            "--max-len", "64", "--seed", "123", "--workers", str(workers), "--rows-per-shard", "2000",
                            "-o", out_dir], check=True, capture_output=True, env=env, cwd=ROOT)
            result["shards"][workers] = tree_sha256(out_dir)
        for name, flags in RUNS.items():
            run_dir = tmp / name
            subprocess.run([*train, "run", "--shards", tmp / "shards1", "--run-dir", run_dir,
                            "--steps", "30", "--batch-size", "16", "--eval-every", "15", "--eval-rows", "64",
                            "--log-every", "5", "--precision", "fp32", "--device", "cpu", "--seed", "3", "--quiet",
                            *flags], check=True, capture_output=True, env=env, cwd=ROOT)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            result["runs"][name] = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "data_wait_frac")}
                                    for r in records]
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
