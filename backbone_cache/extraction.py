"""One extraction run into one cache folder (the library behind `python -m backbone_cache.extract`).

Walkthrough: load the task and the backbone -> plan each split (tokenize, sort by length,
batch) -> create the Zarr arrays and the manifest -> for each batch, run the backbone under
`torch.inference_mode`, round the unpadded states to bf16 straight into a shard buffer, and
hand each full shard to a writer thread, which compresses and writes it while the next
batches run and records progress -> compute importance scores -> mark the manifest complete.
A killed run, rerun with the same settings, resumes at the first shard not recorded.
Nothing here knows a backbone family: the family's module gives the stacks and the states.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backbone_cache.plan import SplitPlan, plan_split
from backbone_cache.writer import BackgroundWriter, StackWriter
from shared import __version__
from shared.allocator import keep_freed_memory
from shared.backbones import load_backbone, pick_device
from shared.cache_format import (
    CODECS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    compressors,
    read_manifest,
    stack_geometry,
    write_json_atomic,
)
from shared.config import DataConfig, ModelConfig
from shared.errors import UserError
from shared.families import Backbone
from shared.tasks import SPLITS
from shared.tokens import unpad

# blosc-lz4 (bit shuffle + LZ4): on the real MiniLM states 5% fewer bytes than zstd1, 18% less
# writer CPU, and the streaming reader's decode about 1.5-2x faster (benchmarks/RESULTS.md)
DEFAULT_CODEC = "blosc-lz4"
DEFAULT_CHUNK_MIB = 1.0  # smaller chunks waste less decoding at block edges
DEFAULT_SHARD_MIB = 256.0
STORAGE_DTYPES = {"bf16": "uint16", "fp8": "uint8", "int8": "int8"}
INITS = ("fisher", "magnitude", "random")  # the pruned init a cache prepares for: fisher stores its scores


@dataclass
class ExtractConfig:
    """Everything an extraction takes (`python -m backbone_cache.extract` fills it from its flags)."""

    out: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    batch_size: int = 64
    device: str = "auto"
    layers: str = "all"  # states kept per stack: "all" or indices, 0 = embeddings
    codec: str | None = None  # None: DEFAULT_CODEC, or the codec of the cache already at `out`
    chunk_mib: float | None = None  # None: DEFAULT_CHUNK_MIB, or what a cache at `out` has
    shard_mib: float | None = None
    storage: str = "bf16"  # stored precision: bf16, fp8 or int8
    outlier_channels: int = 4  # int8: channels per layer kept in bf16
    init: str = "fisher"  # fisher: compute and store Fisher importance for the pruned init
    fisher_samples: int = 1024
    overwrite: bool = False
    quiet: bool = False

    def check(self) -> None:
        for name in ("batch_size", "fisher_samples"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.storage not in STORAGE_DTYPES:
            raise UserError(f"--storage {self.storage!r} is not a storage precision; choose bf16, fp8 or int8")
        if self.storage == "int8" and self.outlier_channels <= 0:
            raise UserError(f"--outlier-channels must be positive for int8, got {self.outlier_channels}")
        if self.init not in INITS:
            raise UserError(f"--init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.codec is not None and self.codec not in CODECS:
            raise UserError(f"unknown --codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        chunk_mib, shard_mib = self.geometry_mib()
        if chunk_mib <= 0 or shard_mib < chunk_mib:
            raise UserError("--chunk-mib must be positive and --shard-mib at least --chunk-mib")
        self.data.check()

    def geometry_mib(self) -> tuple[float, float]:
        """chunk_mib and shard_mib, defaults filled in."""
        return (DEFAULT_CHUNK_MIB if self.chunk_mib is None else self.chunk_mib,
                DEFAULT_SHARD_MIB if self.shard_mib is None else self.shard_mib)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"


def parse_layers(text: str, available: int) -> list[int]:
    if text == "all":
        return list(range(available))
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--layers {text!r} must be 'all' or comma-separated integers") from None
    if not layers or layers[0] < 0 or layers[-1] >= available:
        raise UserError(f"--layers {text!r} is out of range; the backbone has states 0..{available - 1}")
    return layers


def existing_manifest(out: Path) -> dict | None:
    """The manifest of a readable cache at `out`, or None (no cache there, a damaged manifest)."""
    try:
        return read_manifest(out) if (out / MANIFEST).is_file() else None
    except UserError:
        return None


def existing_geometry(manifest: dict | None, default: dict, layer_counts: dict[str, int]) -> dict:
    """The (chunk, shard) tokens per stack of an existing cache's `manifest`; `default` without
    one. A stack no stored split has (train holds no per-candidate stack) takes the geometry of
    a stored stack with as many layers. Any other difference is caught by the plan fingerprint."""
    if manifest is None or not manifest.get("splits"):
        return default
    found, by_layers = {}, {}
    for split_meta in manifest["splits"].values():
        for stack, meta in split_meta["stacks"].items():
            found.setdefault(stack, (int(meta["chunk_tokens"]), int(meta["shard_tokens"])))
            by_layers.setdefault(len(meta["layers"]), found[stack])
    out = {stack: found.get(stack) or by_layers.get(layer_counts[stack]) for stack in default}
    return default if None in out.values() else out


def existing_codec(manifest: dict | None, default: str) -> str:
    """The codec of an existing cache's `manifest`, else `default`."""
    codec = (manifest or {}).get("storage", {}).get("codec")
    return codec if codec in CODECS else default


def plan_fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class Extraction:
    """One extraction run into one cache folder."""

    def __init__(self, config: ExtractConfig, backbone: Backbone | None = None):
        config.check()
        self.config = config
        self.device = pick_device(config.device)
        self.spec, all_splits = config.data.load()
        wanted = list(config.splits)
        missing = [s for s in wanted if s not in all_splits]
        if not wanted or missing:
            raise UserError(f"split {missing[0] if missing else '(none)'!r} is not in the data; available: {', '.join(all_splits)} "
                            f"(pass --splits {','.join(all_splits)})")
        self.splits = {s: all_splits[s] for s in wanted}
        for split, examples in self.splits.items():
            if not examples:
                raise UserError(f"split {split!r} holds no examples; check the data")
        m = config.model
        self.backbone = backbone or load_backbone(m.name, self.device, revision=m.revision, trust_remote_code=m.trust_remote_code)
        self.info = self.backbone.info()
        if config.init == "fisher" and "train" in self.splits:
            self.backbone.score_targets()  # a backbone the pruned init cannot map is refused before any work
        self.layers = {s.name: parse_layers(config.layers, s.num_states) for s in self.backbone.stacks()}
        d = config.data
        self.plans: dict[str, SplitPlan] = {
            split: plan_split(split, examples, self.spec, self.backbone, d.max_length, d.max_target_length, config.batch_size,
                              with_candidates=split != "train")
            for split, examples in self.splits.items()}
        geometry = {stack: stack_geometry(len(layers), self.info.d_model, *config.geometry_mib())
                    for stack, layers in self.layers.items()}
        # the same settings, the same cache: a cache at `out` keeps its geometry and codec unless they are given
        existing = None if config.overwrite else existing_manifest(Path(config.out))
        if config.chunk_mib is None and config.shard_mib is None:
            geometry = existing_geometry(existing, geometry, {s: len(layers) for s, layers in self.layers.items()})
        self.geometry = geometry
        self.codec = config.codec or existing_codec(existing, DEFAULT_CODEC)

    # --- manifest -------------------------------------------------------------------------

    def identity(self) -> dict:
        """Everything that decides the cache's bits; a resume must match it exactly."""
        c = self.config
        return {
            "model": self.info.to_json(),
            "task": self.spec.to_json(),
            "splits": {s: [ex.example_id for ex in p.examples[:3]] + [p.num_examples] for s, p in self.plans.items()},
            "max_length": c.data.max_length,
            "max_target_length": c.data.max_target_length,
            "batch_size": c.batch_size,
            "layers": self.layers,
            "codec": self.codec,
            "storage": [c.storage, c.outlier_channels if c.storage == "int8" else 0],
            "geometry": self.geometry,
            "compute_dtype": str(self.backbone.dtype).removeprefix("torch."),
        }

    def new_manifest(self) -> dict:
        c = self.config
        splits = {}
        for split, plan in self.plans.items():
            stacks = {}
            for stack, offsets in plan.offsets.items():
                chunk, shard = self.geometry[stack]
                tokens = int(offsets[-1])
                stacks[stack] = {
                    "num_sequences": len(offsets) - 1,
                    "sequences_per_example": plan.per_example(stack),
                    "num_tokens": tokens,
                    "layers": self.layers[stack],
                    "chunk_tokens": chunk,
                    "shard_tokens": shard,
                    "num_shards": max(1, -(-tokens // shard)),
                    "shards_done": 0,
                    "precision": c.storage,
                }
            splits[split] = {"num_examples": plan.num_examples, "stacks": stacks, "complete": False}
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": False,
            "plan_fingerprint": plan_fingerprint(self.identity()),
            "model": self.info.to_json(),
            "task": self.spec.to_json(),
            "candidates": self.backbone.candidate_labels(self.spec),
            "primary_stack": self.backbone.stacks()[0].name,
            "max_length": c.data.max_length,
            "max_target_length": c.data.max_target_length,
            "batch_size": c.batch_size,
            "limit": c.data.limit,
            "compute_dtype": str(self.backbone.dtype).removeprefix("torch."),
            "storage": {"logical_dtype": "bfloat16", "zarr_dtype": STORAGE_DTYPES[c.storage], "codec": self.codec,
                        "precision": c.storage, "outlier_channels": c.outlier_channels if c.storage == "int8" else 0},
            "importance": None,
            "data_source": c.data.to_json(),
            "splits": splits,
            "created_by": f"backbone_cache {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # --- folder handling ------------------------------------------------------------------

    def prepare_folder(self) -> tuple[Path, dict, bool]:
        """Decide where to write; return (folder, manifest, swap_into_out_when_done)."""
        out = Path(self.config.out)
        overwrite = self.config.overwrite
        fingerprint = plan_fingerprint(self.identity())
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; choose a folder")
        if out.is_dir() and any(out.iterdir()):
            if not (out / MANIFEST).is_file():
                raise UserError(f"--out {out} is a non-empty folder that is not a cache; choose an empty or new folder")
            try:
                existing = read_manifest(out)
            except UserError:
                existing = None
            same = existing is not None and existing.get("plan_fingerprint") == fingerprint
            if same and (not overwrite or not existing.get("complete")):
                # the same cache: resume it (also under overwrite, whose first run may have been this one),
                # or nothing to do if it is complete; overwrite rebuilds a complete one
                return out, existing, False
            if not overwrite:
                if existing is None:
                    raise UserError(f"--out {out} holds an unreadable or old-format cache; pass --overwrite to replace it")
                raise UserError(
                    f"--out {out} already holds a cache of model {existing['model']['name']!r}, task "
                    f"{existing['task']['name']!r} ({self.differing_setting(existing)}); choose another --out or pass --overwrite"
                )
            staging = out.with_name(out.name + ".overwrite")
            if (staging / MANIFEST).is_file():
                try:
                    staged = read_manifest(staging)
                    if staged.get("plan_fingerprint") == fingerprint:
                        return staging, staged, True
                except UserError:
                    pass
            shutil.rmtree(staging, ignore_errors=True)
            return self.create(staging), self.manifest, True
        return self.create(out), self.manifest, False

    def differing_setting(self, existing: dict) -> str:
        """Name the first setting in which an existing cache's manifest differs from these settings."""
        wanted = self.new_manifest()
        checks = [("model", lambda m: m["model"]), ("task", lambda m: m["task"]), ("--limit", lambda m: m["limit"]),
                  ("--splits", lambda m: sorted(m["splits"])),
                  ("examples", lambda m: {s: v["num_examples"] for s, v in m["splits"].items()}),
                  ("--max-length", lambda m: m["max_length"]), ("--max-target-length", lambda m: m["max_target_length"]),
                  ("--batch-size", lambda m: m["batch_size"]), ("--codec", lambda m: m["storage"]["codec"]),
                  ("--storage", lambda m: (m["storage"]["precision"], m["storage"].get("outlier_channels"))),
                  ("the backbone's dtype (float32 on a CPU or a GPU before Ampere, else bfloat16)", lambda m: m["compute_dtype"]),
                  ("--layers", lambda m: {(split, s): v["layers"] for split, meta in m["splits"].items()
                                          for s, v in meta["stacks"].items()}),
                  ("--chunk-mib/--shard-mib", lambda m: {(split, s): (v["chunk_tokens"], v["shard_tokens"])
                                                         for split, meta in m["splits"].items() for s, v in meta["stacks"].items()})]
        for name, value in checks:
            try:
                if value(existing) != value(wanted):
                    return f"its {name} differs"
            except (KeyError, TypeError):
                return "an older or other layout"
        return "other settings"

    def create(self, folder: Path) -> Path:
        """Lay down the group, the small arrays, the example tables and a fresh manifest."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        import zarr

        storage = self.config.storage
        folder.mkdir(parents=True, exist_ok=True)
        self.manifest = self.new_manifest()
        root = zarr.open_group(str(folder), mode="w", zarr_format=3)
        root.attrs["format"] = FORMAT_NAME
        root.attrs["format_version"] = FORMAT_VERSION
        for split, plan in self.plans.items():
            group = root.require_group(split)
            for stack, offsets in plan.offsets.items():
                chunk, shard = self.geometry[stack]
                layers = self.layers[stack]
                sub = group.require_group(stack)
                sub.create_array(
                    "hidden",
                    shape=(int(offsets[-1]), len(layers), self.info.d_model),
                    chunks=(chunk, 1, self.info.d_model),  # one layer per inner chunk: unused layers are never read
                    shards=(shard, len(layers), self.info.d_model),
                    dtype=STORAGE_DTYPES[storage],
                    compressors=compressors(self.codec),
                    fill_value=0,
                    attributes={"logical_dtype": "bfloat16", "layers": layers, "layout": "[token, layer, d]", "precision": storage},
                )
                self._quantization_arrays(sub, int(offsets[-1]), len(layers), chunk, shard)
                self._small_array(sub, "offsets", offsets)
                for name, sequences in plan.inputs[stack].items():  # input_ids, and labels, token_type_ids, ... where the family has them
                    self._small_array(sub, name, np.concatenate([np.asarray(x, np.int32) for x in sequences]))
            table = {
                "row": np.arange(plan.num_examples, dtype=np.int64),
                "example_id": [ex.example_id for ex in plan.examples],
                "dataset_index": plan.dataset_index,
                "label": [float(ex.label) for ex in plan.examples],
                "texts": [ex.texts for ex in plan.examples],
                "n_tokens": plan.lengths,
                **self.backbone.example_columns(plan.examples, self.spec),
            }
            pq.write_table(pa.table(table), folder / split / "examples.parquet")
        write_json_atomic(folder / MANIFEST, self.manifest)
        return folder

    def _quantization_arrays(self, group, tokens: int, layers: int, chunk: int, shard: int) -> None:
        """fp8/int8: per-token scales, and for int8 the bf16 outlier channels and their per-shard index."""
        storage = self.config.storage
        if storage == "bf16":
            return
        group.create_array("scale", shape=(tokens, layers), chunks=(chunk, 1), shards=(shard, layers), dtype="float32",
                           compressors=compressors(self.codec), fill_value=0)
        if storage == "int8":
            k = self.config.outlier_channels
            group.create_array("outliers", shape=(tokens, layers, k), chunks=(chunk, 1, k), shards=(shard, layers, k),
                               dtype="uint16", compressors=compressors(self.codec), fill_value=0)
            group.create_array("outlier_index", shape=(max(1, -(-tokens // shard)), layers, k), chunks=(1, layers, k),
                               dtype="int32", fill_value=0)

    def shard_encoder(self, group):
        """The function the writer applies to each finished shard (None for bf16)."""
        from shared import quantize

        if self.config.storage == "fp8":
            return lambda bits, index: quantize.encode_fp8(bits)

        def encode_int8(bits, index):
            outlier_index = quantize.choose_outliers(bits, self.config.outlier_channels)
            group["outlier_index"][index] = outlier_index
            return quantize.encode_int8(bits, outlier_index)

        return encode_int8 if self.config.storage == "int8" else None

    @staticmethod
    def _small_array(group, name: str, values: np.ndarray) -> None:
        values = np.asarray(values)
        array = group.create_array(name, shape=values.shape, chunks=(max(1, min(len(values), 1 << 20)),), dtype=values.dtype, fill_value=0)
        array[:] = values

    # --- sizing before any forward pass (--dry-run) ----------------------------------------

    def state_bytes(self, storage: str, layers: int) -> int:
        """Bytes per token of `layers` stored states at a storage precision, before compression."""
        d = self.info.d_model
        per_state = {"bf16": 2 * d, "fp8": d + 4, "int8": d + 4 + 2 * self.config.outlier_channels}[storage]
        return per_state * layers

    def dry_run(self, timed_batches: int = 3) -> str:
        """What the extraction would store, as a report: tokens per split and stack, the cache size per
        storage precision and layer subset, and the time estimated from a few timed batches (nothing is written)."""
        lines = [f"dry run: {self.info.name} ({self.info.family}), task {self.spec.name}; nothing is written", "",
                 "| split | stack | sequences | tokens | states per token (kept / all) |", "|---|---|---|---|---|"]
        tokens = {}
        all_states = {s.name: s.num_states for s in self.backbone.stacks()}
        for split, plan in self.plans.items():
            for stack, offsets in plan.offsets.items():
                tokens[(split, stack)] = int(offsets[-1])
                lines.append(f"| {split} | {stack} | {len(offsets) - 1:,} | {int(offsets[-1]):,} | "
                             f"{len(self.layers[stack])} / {all_states[stack]} |")
        total_tokens = sum(tokens.values())
        lines += ["", f"cache size before compression ({total_tokens:,} stored tokens; {self.codec} typically stores real "
                      "states 1.3-1.4x smaller, benchmarks/RESULTS.md):", "",
                  "| storage | the kept states (--layers) | all states | one state per token |", "|---|---|---|---|"]
        for storage in STORAGE_DTYPES:
            kept = sum(n * self.state_bytes(storage, len(self.layers[stack])) for (_, stack), n in tokens.items())
            every = sum(n * self.state_bytes(storage, all_states[stack]) for (_, stack), n in tokens.items())
            one = sum(n * self.state_bytes(storage, 1) for n in tokens.values())
            mark = " (chosen)" if storage == self.config.storage else ""
            lines.append(f"| {storage}{mark} | {format_bytes(kept)} | {format_bytes(every)} | {format_bytes(one)} |")
        lines += ["", self.time_estimate(timed_batches)]
        return "\n".join(lines)

    def time_estimate(self, timed_batches: int) -> str:
        """Seconds per primary token from a few batches spread over the largest split, times all tokens."""
        plan = max(self.plans.values(), key=lambda p: p.num_examples)
        picks = sorted({int(i) for i in np.linspace(0, len(plan.batches) - 1, min(timed_batches, len(plan.batches)))})
        primary = plan.offsets[plan.stacks[0].name]
        self.forward_batch(plan, plan.batches[picks[-1]])  # warm-up (kernels, allocator), not timed
        start, timed_tokens = time.perf_counter(), 0
        for index in picks:
            rows = plan.batches[index]
            self.forward_batch(plan, rows)
            timed_tokens += int(primary[rows.stop] - primary[rows.start])
        per_token = (time.perf_counter() - start) / max(timed_tokens, 1)
        total = sum(int(p.offsets[p.stacks[0].name][-1]) for p in self.plans.values())
        return (f"time: about {format_seconds(per_token * total)} for the backbone's forward passes on {self.device} "
                f"({len(picks)} timed batches of {plan.name}, {timed_tokens:,} tokens, {1 / per_token:,.0f} tokens/s; "
                "writing overlaps the forwards; Fisher scores come on top)")

    # --- the forward loop -----------------------------------------------------------------

    def forward_batch(self, plan: SplitPlan, rows: range) -> dict[str, torch.Tensor]:
        """Run one batch; return each stack's unpadded states [tokens, layers, d] in storage order."""
        batch = plan.token_batch(rows, self.device)
        states = self.backbone.states(batch)
        return {stack: unpad(states[stack], batch[stack]["attention_mask"], self.layers[stack]) for stack in batch}

    def run(self) -> Path:
        keep_freed_memory()  # the forward's large temporaries reuse memory (shared.allocator)
        folder, manifest, swap = self.prepare_folder()
        self.manifest = manifest
        if manifest.get("complete") and swap:  # a rebuild killed between its last write and the swap
            folder, swap = self.swap_into_out(folder), False
        if manifest.get("complete"):
            if self.fisher_missing(manifest):
                # importance scores sit beside the states and are not part of the cache's identity: add them in place
                self.store_importance(folder)
                write_json_atomic(folder / MANIFEST, manifest)
                print(f"cache {folder} was complete; added Fisher importance scores over "
                      f"{manifest['importance']['samples']} training examples", file=sys.stderr)
                return folder
            print(f"cache {folder} is already complete; nothing to do (pass --overwrite to rebuild)", file=sys.stderr)
            return folder
        start = time.perf_counter()
        for split, plan in self.plans.items():
            if not manifest["splits"][split]["complete"]:
                self.extract_split(folder, plan)
        self.store_importance(folder)
        manifest["complete"] = True
        manifest["extract_seconds"] = round(time.perf_counter() - start, 3)
        write_json_atomic(folder / MANIFEST, manifest)
        return self.swap_into_out(folder) if swap else folder

    def swap_into_out(self, folder: Path) -> Path:
        """Put a complete rebuilt cache at `out` in place of the old one."""
        out = Path(self.config.out)
        trash = out.with_name(out.name + ".replaced")
        shutil.rmtree(trash, ignore_errors=True)
        out.rename(trash)
        folder.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
        return out

    def extract_split(self, folder: Path, plan: SplitPlan) -> None:
        import zarr

        split_meta = self.manifest["splits"][plan.name]
        background = BackgroundWriter()
        writers: dict[str, StackWriter] = {}
        for stack, meta in split_meta["stacks"].items():
            # write_empty_chunks skips zarr's full scan of each shard for an all-zero one (states never are)
            array = zarr.open_array(str(folder / plan.name / stack / "hidden"), mode="r+").with_config({"write_empty_chunks": True})

            def on_shard(index: int, meta=meta) -> None:
                meta["shards_done"] = index + 1
                write_json_atomic(folder / MANIFEST, self.manifest)

            group = zarr.open_group(str(folder / plan.name / stack), mode="r+")
            writers[stack] = StackWriter(array, meta["shard_tokens"], meta["num_tokens"], meta["shards_done"], on_shard, background,
                                         encoder=self.shard_encoder(group), group=group)
        # The first batch still needed by any stack: the one holding its first uncommitted token.
        batch_size = self.config.batch_size
        first_batch = len(plan.batches)
        for stack, writer in writers.items():
            if writer.done:
                continue
            sequence = int(np.searchsorted(plan.offsets[stack], writer.committed, side="right") - 1)
            first_batch = min(first_batch, sequence // plan.per_example(stack) // batch_size)
        done_examples = plan.batches[first_batch].start if first_batch < len(plan.batches) else plan.num_examples
        bar = tqdm(total=plan.num_examples, initial=done_examples, desc=f"extract {plan.name}", unit="ex",
                   disable=self.config.quiet, dynamic_ncols=True)
        primary = plan.offsets[plan.stacks[0].name]
        tokens_done, t0 = 0, time.perf_counter()
        try:
            for rows in plan.batches[first_batch:]:
                states = self.forward_batch(plan, rows)
                for stack, writer in writers.items():
                    writer.write(int(plan.offsets[stack][rows.start * plan.per_example(stack)]), states[stack])
                tokens_done += int(primary[rows.stop] - primary[rows.start])
                elapsed = time.perf_counter() - t0
                written = sum(w.bytes_written for w in writers.values())
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{tokens_done / elapsed:,.0f}", written=f"{written / 2**20:,.0f}MiB", refresh=False)
        finally:
            background.close()
            bar.close()
        if not all(w.done for w in writers.values()):
            raise RuntimeError(f"split {plan.name}: writers ended before all tokens were written")
        split_meta["complete"] = True
        write_json_atomic(folder / MANIFEST, self.manifest)

    def fisher_samples(self) -> int:
        return min(self.config.fisher_samples, self.plans["train"].num_examples)

    def fisher_missing(self, manifest: dict) -> bool:
        """Fisher scores are asked for and the cache lacks them (or has them over another sample count)."""
        if self.config.init != "fisher" or "train" not in self.plans:
            return False
        have = manifest.get("importance") or {}
        return have.get("kind") != "fisher" or have.get("samples") != self.fisher_samples()

    def store_importance(self, folder: Path) -> None:
        if self.config.init != "fisher" or "train" not in self.plans:
            return
        from backbone_cache.importance import fisher_scores, save_importance

        scores = fisher_scores(self.backbone, self.spec, self.plans["train"], self.config.fisher_samples, quiet=self.config.quiet)
        save_importance(folder / "importance.safetensors", scores, "fisher")
        self.manifest["importance"] = {"kind": "fisher", "file": "importance.safetensors", "samples": self.fisher_samples()}
