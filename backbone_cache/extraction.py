"""One extraction run into one cache folder (the library behind `python -m backbone_cache.extract`).

Walkthrough: load the task and the backbone -> plan each split (tokenize, sort by length,
batch) -> create the Zarr arrays and the manifest -> for each batch, run the backbone under
`torch.inference_mode`, round the unpadded states to bf16 straight into a shard buffer, and
hand each full shard to a writer thread, which compresses and writes it while the next
batches run and records progress -> compute importance scores -> mark the manifest complete.
A killed run, rerun with the same settings, resumes every shard not recorded.
Nothing here knows a backbone family: the family's module gives the stacks and the states.

Several processes (torchrun): every process plans the same batches; rank 0 creates and sizes
the arrays and the manifest (or finds the cache to resume) and broadcasts it; the shards not
yet recorded are dealt out to the ranks as whole shards (never two writers in one shard),
balanced by their share of the forward work; each rank runs the batches its shards need and
records each finished shard as its own marker object under `.progress/`; after a barrier,
rank 0 checks every marker, computes the importance scores, writes the complete manifest and
removes `.progress/`. The output is a location (shared.stores): a folder, or any fsspec URL
(s3://bucket/prefix, gs://...) written through zarr's FsspecStore.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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
from shared import __version__, distributed
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
)
from shared.config import DataConfig, ModelConfig, index_list
from shared.errors import UserError
from shared.families import Backbone
from shared.stores import CacheLocation
from shared.tasks import SPLITS
from shared.tokens import unpad

# blosc-lz4 (bit shuffle + LZ4): on the real MiniLM states 5% fewer bytes than zstd1, 18% less
# writer CPU, and the streaming reader's decode about 1.5-2x faster (benchmarks/RESULTS.md)
DEFAULT_CODEC = "blosc-lz4"
DEFAULT_CHUNK_MIB = 1.0  # smaller chunks waste less decoding at block edges
DEFAULT_SHARD_MIB = 256.0
STORAGE_DTYPES = {"bf16": "uint16", "fp8": "uint8", "int8": "int8"}
INITS = ("fisher", "magnitude", "random")  # the pruned init a cache prepares for: fisher stores its scores
PROGRESS = ".progress"  # <split>/<stack>/<shard>: one empty marker per finished shard; removed once complete
# test hook: "RANK:N" makes that rank exit (status 3) right after recording its N-th shard, as a killed process would
EXIT_AFTER_SHARDS_ENV = "LST_TEST_EXIT_AFTER_SHARDS"


@dataclass
class ExtractConfig:
    """Everything an extraction takes (`python -m backbone_cache.extract` fills it from its flags)."""

    out: str  # a folder, or an fsspec URL: s3://bucket/prefix, gs://bucket/prefix, ...
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
    storage_options: dict = field(default_factory=dict)  # fsspec options of a URL --out (credentials, endpoint_url)

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
    layers = sorted(set(index_list(text, "--layers")))
    if not layers or layers[0] < 0 or layers[-1] >= available:
        raise UserError(f"--layers {text!r} is out of range; the backbone has states 0..{available - 1}")
    return layers


def existing_manifest(out: CacheLocation) -> dict | None:
    """The manifest of a readable cache at `out`, or None (no cache there, a damaged manifest)."""
    try:
        return read_manifest(out) if out.is_file(MANIFEST) else None
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


def remove_leftovers(folder: CacheLocation) -> None:
    """Temporary files a killed process left in a local cache (zarr's `*.partial`, our `*.tmp`);
    object stores have none (a PUT is atomic)."""
    if folder.is_local:
        for pattern in ("*.partial", "*.tmp"):
            for path in folder.path.rglob(pattern):
                path.unlink(missing_ok=True)


def plan_fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class Extraction:
    """One extraction run into one cache folder."""

    def __init__(self, config: ExtractConfig, backbone: Backbone | None = None):
        config.check()
        self.config = config
        self.out = CacheLocation.of(config.out, config.storage_options)
        self.out.check_access()  # a missing bucket or credentials fail here, before the backbone loads
        self.ranks = distributed.setup(config.device)
        self.device = pick_device(config.device)
        if self.ranks.distributed and self.device.type == "cuda":
            self.device = torch.device(distributed.rank_device("cuda", self.ranks))
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
        existing = None if config.overwrite else existing_manifest(self.out)
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

    def prepare_folder(self) -> tuple[CacheLocation, dict, bool]:
        """Decide where to write; return (location, manifest, swap_into_out_when_done)."""
        if not self.out.is_local:
            return self.prepare_remote()
        folder, manifest, swap = self.prepare_local()
        return CacheLocation.of(folder), manifest, swap

    def prepare_remote(self) -> tuple[CacheLocation, dict, bool]:
        """prepare_folder on object storage: no renames there, so --overwrite deletes the old cache first."""
        out = self.out
        fingerprint = plan_fingerprint(self.identity())
        if out.is_file(MANIFEST):
            try:
                existing = read_manifest(out)
            except UserError:
                existing = None
            same = existing is not None and existing.get("plan_fingerprint") == fingerprint
            if same and (not self.config.overwrite or not existing.get("complete")):
                return out, existing, False
            if not self.config.overwrite:
                if existing is None:
                    raise UserError(f"--out {out} holds an unreadable or old-format cache; pass --overwrite to replace it")
                raise UserError(
                    f"--out {out} already holds a cache of model {existing['model']['name']!r}, task "
                    f"{existing['task']['name']!r} ({self.differing_setting(existing)}); choose another --out or pass --overwrite"
                )
            print(f"--overwrite on object storage: deleting the cache at {out} first (no atomic swap there)", file=sys.stderr)
            out.remove(MANIFEST)  # first, so no reader takes the half-deleted cache for a cache
            out.remove(recursive=True)
        elif out.sizes():
            if not self.config.overwrite:
                raise UserError(f"--out {out} holds objects but no {MANIFEST}; it is not a cache: choose an empty prefix "
                                "(or pass --overwrite to delete what is there)")
            out.remove(recursive=True)
        return self.create(out), self.manifest, False

    def prepare_local(self) -> tuple[Path, dict, bool]:
        out = self.out.path
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
            return self.create(CacheLocation.of(staging)).path, self.manifest, True
        return self.create(CacheLocation.of(out)).path, self.manifest, False

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

    def create(self, folder: CacheLocation) -> CacheLocation:
        """Lay down the group, the small arrays, the example tables and a fresh manifest."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        storage = self.config.storage
        folder.makedirs()
        self.manifest = self.new_manifest()
        root = folder.open_group(mode="w")
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
            buffer = io.BytesIO()
            pq.write_table(pa.table(table), buffer)
            folder.write_bytes(f"{split}/examples.parquet", buffer.getvalue())
        folder.write_json(MANIFEST, self.manifest)
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

    def run(self) -> Path | str:
        """Extract (or resume, or finish) the cache; returns its folder, or its URL on object storage.

        Under torchrun every rank calls this; ranks other than 0 return once their shards are
        written, while rank 0 computes the importance scores and marks the cache complete."""
        keep_freed_memory()  # the forward's large temporaries reuse memory (shared.allocator)
        decision: tuple = ("error", "rank 0 did not prepare the cache")
        if self.ranks.is_main:
            try:
                folder, manifest, swap = self.prepare_folder()
                if manifest.get("complete") and swap:  # a rebuild killed between its last write and the swap
                    folder, swap = CacheLocation.of(self.swap_into_out(folder.path)), False
                decision = ("ok", folder.url, manifest, swap, self.done_shards(folder, manifest))
            except UserError as err:
                decision = ("error", str(err))
            except BaseException as err:
                decision = ("error", f"rank 0 failed: {type(err).__name__}: {err}")
                distributed.broadcast_object(decision)
                raise
        decision = distributed.broadcast_object(decision)  # the arrays exist and are sized before any rank writes
        if decision[0] == "error":
            raise UserError(decision[1])
        _, url, manifest, swap, done = decision
        folder = CacheLocation.of(url, self.config.storage_options)
        self.manifest = manifest
        if manifest.get("complete"):
            if self.ranks.is_main:
                self.finish_complete(folder, manifest)
            return self.result(folder)
        start = time.perf_counter()
        work = self.assign_shards(manifest, done, self.ranks.world_size)[self.ranks.rank]
        for split, plan in self.plans.items():
            if work.get(split) or (not self.ranks.distributed and not manifest["splits"][split]["complete"]):
                self.extract_split(folder, plan, work.get(split, {}), done)
        distributed.barrier()  # every rank's shards are written
        if not self.ranks.is_main:
            return self.result(folder)
        done = self.done_shards(folder, manifest)
        for split, split_meta in manifest["splits"].items():
            for stack, meta in split_meta["stacks"].items():
                missing = sorted(set(range(meta["num_shards"])) - done[f"{split}/{stack}"])
                if missing:
                    raise RuntimeError(f"{split}/{stack}: shards {missing[:5]} were not recorded; rerun the same command")
                meta["shards_done"] = meta["num_shards"]
            split_meta["complete"] = True
        self.store_importance(folder)
        manifest["complete"] = True
        manifest["extract_seconds"] = round(time.perf_counter() - start, 3)
        folder.write_json(MANIFEST, manifest)
        folder.remove(PROGRESS, recursive=True)
        remove_leftovers(folder)
        return self.result(CacheLocation.of(self.swap_into_out(folder.path)) if swap else folder)

    def result(self, folder: CacheLocation) -> Path | str:
        return folder.path if folder.is_local else folder.url

    def finish_complete(self, folder: CacheLocation, manifest: dict) -> None:
        """A complete cache: add Fisher scores where asked for and missing, else nothing to do."""
        if self.fisher_missing(manifest):
            # importance scores sit beside the states and are not part of the cache's identity: add them in place
            self.store_importance(folder)
            folder.write_json(MANIFEST, manifest)
            print(f"cache {folder} was complete; added Fisher importance scores over "
                  f"{manifest['importance']['samples']} training examples", file=sys.stderr)
            return
        print(f"cache {folder} is already complete; nothing to do (pass --overwrite to rebuild)", file=sys.stderr)

    def swap_into_out(self, folder: Path) -> Path:
        """Put a complete rebuilt cache at `out` in place of the old one (local folders only)."""
        out = self.out.path
        trash = out.with_name(out.name + ".replaced")
        shutil.rmtree(trash, ignore_errors=True)
        out.rename(trash)
        folder.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
        return out

    # --- shards and ranks -------------------------------------------------------------------

    @staticmethod
    def done_shards(folder: CacheLocation, manifest: dict) -> dict[str, set[int]]:
        """{"split/stack": shard indices recorded as written}: the markers under .progress/, and the
        leading `shards_done` of the manifest (one process records both; older caches only the latter)."""
        done = {f"{split}/{stack}": set(range(int(meta.get("shards_done", 0))))
                for split, split_meta in manifest["splits"].items() for stack, meta in split_meta["stacks"].items()}
        for key in folder.sizes(PROGRESS):
            where, _, index = key.rpartition("/")
            if where in done and index.isdigit():
                done[where].add(int(index))
        return done

    def shard_batches(self, plan: SplitPlan, stack: str, meta: dict, index: int) -> range:
        """The batches of `plan` that hold tokens of shard `index` of `stack`."""
        offsets, shard = plan.offsets[stack], int(meta["shard_tokens"])
        first, last = index * shard, min((index + 1) * shard, int(meta["num_tokens"])) - 1
        per_example, batch_size = plan.per_example(stack), self.config.batch_size
        lo, hi = (int(np.searchsorted(offsets, t, side="right") - 1) // per_example // batch_size for t in (first, last))
        return range(lo, hi + 1)

    def assign_shards(self, manifest: dict, done: dict[str, set[int]], world: int) -> list[dict[str, dict[str, list[int]]]]:
        """Deal the shards not yet done to `world` ranks: [rank] -> {split: {stack: shard indices}}.

        Whole shards only. The batches the remaining shards need are laid out on one timeline
        (splits in order), each weighted by its tokens over every stack (the forward's work);
        a shard goes to the rank whose equal share of that timeline holds its midpoint, so each
        rank runs a nearly contiguous run of batches and shares at most a boundary batch with
        its neighbours. The deal depends only on the plan and `done`, the same on every rank."""
        items = []
        for split, plan in self.plans.items():
            for stack, meta in manifest["splits"][split]["stacks"].items():
                for index in range(int(meta["num_shards"])):
                    if index not in done[f"{split}/{stack}"]:
                        items.append((split, stack, index, self.shard_batches(plan, stack, meta, index)))
        needed = {(split, b) for split, _, _, batches in items for b in batches}
        order = {split: n for n, split in enumerate(self.plans)}
        position, total = {}, 0.0
        for split, b in sorted(needed, key=lambda x: (order[x[0]], x[1])):
            plan, rows = self.plans[split], self.plans[split].batches[b]
            cost = sum(int(o[rows.stop * plan.per_example(s)] - o[rows.start * plan.per_example(s)]) for s, o in plan.offsets.items())
            position[(split, b)] = (total, cost)
            total += cost
        work: list[dict[str, dict[str, list[int]]]] = [{} for _ in range(world)]
        for split, stack, index, batches in items:
            begin = position[(split, batches.start)][0]
            end = sum(position[(split, batches[-1])])
            rank = min(world - 1, int((begin + end) / 2 * world / max(total, 1)))
            work[rank].setdefault(split, {}).setdefault(stack, []).append(index)
        return work

    def record_shard(self, folder: CacheLocation, split: str, stack: str, index: int) -> None:
        """A shard is on storage: write its marker (any rank), and with one process also the manifest's count."""
        folder.write_bytes(f"{PROGRESS}/{split}/{stack}/{index}", b"")
        self._written += 1
        if not self.ranks.distributed:
            meta = self.manifest["splits"][split]["stacks"][stack]
            self._done[f"{split}/{stack}"].add(index)
            while meta["shards_done"] in self._done[f"{split}/{stack}"]:
                meta["shards_done"] += 1
            folder.write_json(MANIFEST, self.manifest)
        hook = os.environ.get(EXIT_AFTER_SHARDS_ENV, "")
        if hook and hook.split(":")[0] == str(self.ranks.rank) and self._written >= int(hook.split(":")[1]):
            os._exit(3)

    def extract_split(self, folder: CacheLocation, plan: SplitPlan, shards: dict[str, list[int]],
                      done: dict[str, set[int]]) -> None:
        """Write the shards `shards` ({stack: indices}) of one split, running only the batches they need."""
        split_meta = self.manifest["splits"][plan.name]
        self._done = {k: set(v) for k, v in done.items()}
        self._written = getattr(self, "_written", 0)
        background = BackgroundWriter()
        writers: dict[str, StackWriter] = {}
        needed: set[int] = set()
        for stack, meta in split_meta["stacks"].items():
            if not shards.get(stack):
                continue
            # write_empty_chunks skips zarr's full scan of each shard for an all-zero one (states never are)
            array = folder.open_array(f"{plan.name}/{stack}/hidden", mode="r+").with_config({"write_empty_chunks": True})

            def on_shard(index: int, stack=stack) -> None:
                self.record_shard(folder, plan.name, stack, index)

            group = folder.open_group(f"{plan.name}/{stack}", mode="r+")
            writers[stack] = StackWriter(array, meta["shard_tokens"], meta["num_tokens"], 0, on_shard, background,
                                         encoder=self.shard_encoder(group), group=group, shards=shards[stack])
            for index in shards[stack]:
                needed.update(self.shard_batches(plan, stack, meta, index))
        batches = [plan.batches[b] for b in sorted(needed)]
        done_examples = plan.num_examples - sum(len(rows) for rows in batches)
        rank = f" rank {self.ranks.rank}" if self.ranks.distributed else ""
        bar = tqdm(total=plan.num_examples, initial=done_examples, desc=f"extract {plan.name}{rank}", unit="ex",
                   disable=self.config.quiet, dynamic_ncols=True, position=self.ranks.local_rank if rank else None)
        primary = plan.offsets[plan.stacks[0].name]
        tokens_done, t0 = 0, time.perf_counter()
        try:
            for rows in batches:
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
        if not self.ranks.distributed:
            split_meta["complete"] = True
            folder.write_json(MANIFEST, self.manifest)

    def fisher_samples(self) -> int:
        return min(self.config.fisher_samples, self.plans["train"].num_examples)

    def fisher_missing(self, manifest: dict) -> bool:
        """Fisher scores are asked for and the cache lacks them (or has them over another sample count)."""
        if self.config.init != "fisher" or "train" not in self.plans:
            return False
        have = manifest.get("importance") or {}
        return have.get("kind") != "fisher" or have.get("samples") != self.fisher_samples()

    def store_importance(self, folder: CacheLocation) -> None:
        if self.config.init != "fisher" or "train" not in self.plans:
            return
        from backbone_cache.importance import fisher_scores, importance_bytes

        scores = fisher_scores(self.backbone, self.spec, self.plans["train"], self.config.fisher_samples, quiet=self.config.quiet)
        folder.write_bytes("importance.safetensors", importance_bytes(scores, "fisher"))  # local: temp file, rename
        self.manifest["importance"] = {"kind": "fisher", "file": "importance.safetensors", "samples": self.fisher_samples()}
