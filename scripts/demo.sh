#!/usr/bin/env bash
# The main job end to end on a corpus every machine with Python has offline: the standard library's docstrings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bin=.venv/bin
"$bin/bertprep" demo-corpus -o data/pydoc.txt
"$bin/bertprep" vocab -i data/pydoc.txt --vocab-size 8000 --force
"$bin/bertprep" shard --max-len 128 --seed 123 --force
"$bin/bertprep" verify data/pydoc_128
"$bin/bertprep" peek data/pydoc_128 -n 2
"$bin/bertprep" peek data/pydoc_128 --stats
