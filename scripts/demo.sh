#!/usr/bin/env bash
# The main job end to end on a corpus every machine with Python has offline: the standard library's docstrings.
# Prepares shards, trains a small ModernBERT for a few minutes on the CPU, shows what it learned, and exports it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bin=.venv/bin
"$bin/bertprep" demo-corpus -o data/pydoc.txt
"$bin/bertprep" vocab -i data/pydoc.txt --vocab-size 8000 --force
"$bin/bertprep" shard --max-len 128 --seed 123 --val-fraction 0.05 --force
"$bin/bertprep" verify data/pydoc_128
"$bin/bertprep" peek data/pydoc_128 -n 1
"$bin/bertprep" peek data/pydoc_128 --stats
# ModernBERT (rotary positions) reads context at 128-token rows within a CPU demo's minutes; its defaults re-mask
# the shards' 15% at 30% on the fly. The demo corpus is small (2,103 rows), so it takes more, smaller steps: 16 rows
# a step learned more in the same time than 32 (docs/benchmarks.md, "The README's examples").
"$bin/berttrain" run --shards data/pydoc_128 --arch modernbert --size mini --batch-size 16 --steps 900 \
  --eval-every 450 --run-dir runs/demo --force
"$bin/berttrain" eval --run runs/demo --samples 1
"$bin/berttrain" export --run runs/demo --hf runs/demo/hf --force
"$bin/berttrain" predict --run runs/demo -k 3 "return the [MASK] of the list ." "if the file does not [MASK] , an error is raised ."
