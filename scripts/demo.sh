#!/usr/bin/env bash
# The main job end to end on a corpus every machine with Python has offline: the standard library's docstrings.
# Prepares shards, trains a tiny BERT for a few minutes on the CPU, shows what it learned, and exports it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bin=.venv/bin
"$bin/bertprep" demo-corpus -o data/pydoc.txt
"$bin/bertprep" vocab -i data/pydoc.txt --vocab-size 8000 --force
# Rows of 16 tokens, not the usual 128: attention starts uniform, and a masked slot finds its neighbours among 15
# positions within the minutes a CPU demo has, where among 127 it would take many times longer.
"$bin/bertprep" shard --max-len 16 --seed 123 --val-fraction 0.05 --force
"$bin/bertprep" verify data/pydoc_16
"$bin/bertprep" peek data/pydoc_16 -n 1
"$bin/bertprep" peek data/pydoc_16 --stats
"$bin/berttrain" run --shards data/pydoc_16 --size tiny --batch-size 128 --masking dynamic --steps 1500 \
  --eval-every 500 --run-dir runs/demo --force
"$bin/berttrain" eval --run runs/demo --samples 1
"$bin/berttrain" export --run runs/demo --hf runs/demo/hf --force
"$bin/berttrain" predict --run runs/demo -k 3 "return the [MASK] of the list ." "if the file does not [MASK] , an error is raised ."
