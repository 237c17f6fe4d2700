#!/usr/bin/env bash
# The checks only a GPU can run, prepared to fit one short lease of a device machine (about 8-10 minutes;
# the rows run in order of need, so a 600 s limit cuts the last ones first).
#
#   bash scripts/gpu_check.sh prepare   # here, on the CPU: shards and corpora into data/gpu_check (~15 MB)
#   bash scripts/gpu_check.sh device    # there, with data/gpu_check carried: tests, torchrun, benchmarks
#
# With the device tool: run(command="bash scripts/gpu_check.sh device", carry=["data/gpu_check"], timeout_s=600).
# The device step uses the machine's own python3 and PyTorch (nothing is installed there; zstandard, which only .zst
# inputs need, may be missing) and writes its log to $OUT/gpu_check.log when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=data/gpu_check

prepare() {
  local bin=.venv/bin shared=${BERT_SHARED_DIR:-../shared}
  [ -x "$bin/bertprep" ] || bash scripts/install.sh
  mkdir -p "$dir/corpora/wikitext-2"
  cp "$shared"/corpora/wikitext-2/wiki.{valid,test}.tokens "$dir/corpora/wikitext-2/"
  # WikiText-2 test 16 times over: 29k rows of 128 tokens, enough for 100 steps of 256 rows; valid to evaluate on.
  local wiki=$dir/corpora/wikitext-2
  for i in $(seq 16); do cat "$wiki/wiki.test.tokens"; done > "$dir/wiki.x16.tokens"
  "$bin/bertprep" vocab -i "$wiki/wiki.valid.tokens" -i "$wiki/wiki.test.tokens" -o "$dir/vocab" --vocab-size 30522 \
    --force
  "$bin/bertprep" shard -i "$dir/wiki.x16.tokens" --val "$wiki/wiki.valid.tokens" --vocab "$dir/vocab" \
    -o "$dir/wiki_128" --max-len 128 --force --quiet
  rm "$dir/wiki.x16.tokens"
  du -sh "$dir"
}

device() {
  local py=${PYTHON:-python3} log=${OUT:-/tmp}/gpu_check.log
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BERT_SHARED_DIR=$PWD/$dir
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    echo "== the device tests (CUDA variants included)"
    timeout 240 "$py" -m pytest -q -rs tests/train/test_device.py || echo "FAILED: device tests"
    echo "== torchrun, 1 process: the launcher's environment and its device pick"
    timeout 120 "$py" -m torch.distributed.run --nproc_per_node 1 -m train run --shards "$dir/wiki_128" \
      --size tiny --steps 20 --log-every 10 --eval-every 20 --run-dir /tmp/gpu_check_ddp --force --quiet \
      || echo "FAILED: torchrun"
    echo "== BERT-base step against Hugging Face's, bf16, batch 64 x 128 (no data path)"
    timeout 180 "$py" bench/train.py --size base --batch-size 64 --steps 20 --warmup 3 --device cuda \
      --precision bf16 || echo "FAILED: bench/train.py"
    # modernbert base beside bert base (the row above at 128 tokens) at 128 and 512 tokens, each against Hugging
    # Face's of the same shape, 64 rows a step, masked slots at each arch's rate (30% / 15%).
    for row in "modernbert 128 64 39" "modernbert 512 64 154" "bert 512 64 77"; do
      set -- $row
      echo "== $1 base, bf16, batch $3 x $2, $4 masked a row (no data path)"
      timeout 150 "$py" bench/train.py --arch "$1" --size base --seq-len "$2" --batch-size "$3" --predictions "$4" \
        --steps 20 --warmup 3 --device cuda --precision bf16 || echo "FAILED: bench/train.py --arch $1 --seq-len $2"
    done
    for batch in 64 256; do
      echo "== BERT-base through berttrain run, data path included, bf16, batch $batch x 128"
      timeout 180 "$py" bench/train.py --size base --batch-size "$batch" --steps 40 --warmup 5 --device cuda \
        --precision bf16 --shards "$dir/wiki_128" || echo "FAILED: bench/train.py --shards, batch $batch"
    done
    echo "== the same, batch 256, --compile"
    timeout 300 "$py" bench/train.py --size base --batch-size 256 --steps 40 --warmup 10 --device cuda \
      --precision bf16 --shards "$dir/wiki_128" --compile || echo "FAILED: bench/train.py --shards --compile"
  } 2>&1 | tee "$log"
}

case "${1:-}" in
  prepare) prepare ;;
  device) device ;;
  *) echo "usage: bash scripts/gpu_check.sh prepare|device" >&2; exit 2 ;;
esac
