#!/usr/bin/env bash
# Every GPU figure in one call on a lent GPU machine (see benchmarks/RESULTS.md, "not yet measured").
#
# Here, once:   bash benchmarks/gpu_prepare.sh   (zarr, numcodecs, datasets and scattertext wheels,
#               and the embedded tokenizer's files, into .whl/)
# Then, with the device tool, carrying .whl:
#   bash benchmarks/gpu_check.sh SECONDS
# SECONDS is the time the whole script may take (default 540); each step gets a share and is
# cut at its limit, so a slow step costs its own figure only. Results go to $OUT (or ./gpu-out):
# one JSON or log per step, and summary.txt. Order: cheapest and most wanted first.
set -uo pipefail
budget=${1:-540}
out=${OUT:-gpu-out}
mkdir -p "$out"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
step() {  # step NAME SHARE_OF_REMAINING_PERCENT command...
  local name=$1 share=$2; shift 2
  local limit=$(( $(left) * share / 100 ))
  if (( limit < 20 )); then echo "$name: skipped (no time left)" | tee -a "$out/summary.txt"; return; fi
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$out/summary.txt"
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
[ -d .whl/tokenizer ] && export LST_TOKENIZER_DIR=$PWD/.whl/tokenizer  # tests/make_tiny_t5.py
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/summary.txt"
python3 -c "import torch, zarr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zarr', zarr.__version__)" | tee -a "$out/summary.txt"

# 1. the GPU code paths: tests that use CUDA when it is there (tiers, autocast, pinned memory)
# (not -x: every test reports; the MiniLM tests skip, its weights cannot be carried)
step tests 25 python3 -m pytest -q -rs tests/test_streaming.py tests/test_side.py -k "not minilm"
# 2. issue 4: T5-large-shaped cached vs live epoch on the GPU (target >= 3x), GPU / RAM / disk tiers
step stream 45 python3 benchmarks/bench_stream.py --shape t5-large --drop-layers 12 --device cuda --examples 2000 --work /tmp/stream-large
# 3. issue 6: the CUDA memory table (max_memory_allocated), T5-base shape
step compare 60 python3 benchmarks/bench_compare.py t5-base-shape --device cuda --memory-on device --time-steps 3
# 4. issue 2: extraction / plain inference on the GPU
step extract 90 python3 benchmarks/bench_extract.py --bert-base-shaped --examples 3000 --rounds 2 --device cuda
for f in tests stream compare extract; do tail -n 40 "$out/$f.log" >"$out/$f.tail.txt" 2>/dev/null; done
cat "$out/summary.txt"
