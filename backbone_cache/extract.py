"""`python -m backbone_cache.extract`: run the frozen backbone once, store its ladder inputs.

Walkthrough: load the task and the backbone -> plan each split (tokenize, sort by length,
batch) -> create the Zarr arrays and the manifest -> for each batch, run the backbone under
`torch.inference_mode`, round the unpadded states to bf16 straight into a shard buffer, and
hand each full shard to a writer thread, which compresses and writes it while the next
batches run and records progress -> compute importance scores -> mark the manifest complete.
A killed run, rerun with the same command, resumes at the first shard not recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backbone_cache.plan import SplitPlan, plan_split
from backbone_cache.writer import BackgroundWriter, StackWriter
from shared import __version__
from shared.allocator import keep_freed_memory
from shared.backbones import Backbone, load_backbone, pick_device
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
from shared.errors import UserError, cli_entry
from shared.tasks import SPLITS, load_task

# blosc-lz4 (bit shuffle + LZ4) since 2026-11-27 (issue 4), zstd1 before: on the real MiniLM states 5% fewer
# bytes, 18% less writer CPU, and the streaming reader's decode about 1.5-2x faster (benchmarks/RESULTS.md)
DEFAULT_CODEC = "blosc-lz4"
DEFAULT_CHUNK_MIB = 1.0  # 2.0 before 2026-11-27 (issue 4): smaller chunks waste less decoding at block edges
DEFAULT_SHARD_MIB = 256.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backbone_cache.extract", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="hub name or local folder (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--revision", default=None, help="hub revision of --model")
    p.add_argument("--task", default=None, help="GLUE task (sst2, mnli, ...), 'local', or rotten_tomatoes (default)")
    p.add_argument("--data", action="append", default=[], metavar="SPLIT=PATH", help="local data file (csv, jsonl, parquet)")
    p.add_argument("--text-fields", default="", help="local data: comma-separated text columns")
    p.add_argument("--label-field", default="label", help="local data: label column")
    p.add_argument("--label-kind", default="class", choices=["class", "regression"], help="local data: label kind")
    p.add_argument("--out", required=True, help="cache folder to create (or resume)")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to extract")
    p.add_argument("--max-length", type=int, default=128, help="source tokens kept per example")
    p.add_argument("--max-target-length", type=int, default=128, help="T5 target tokens kept per example")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--limit", type=int, default=None, help="keep the first N examples of each split")
    p.add_argument("--layers", default="all", help="states kept per stack: 'all' or indices, 0 = embeddings")
    p.add_argument("--codec", default=None, choices=CODECS,
                   help=f"compression of hidden states (default {DEFAULT_CODEC}, or the codec of the cache already at --out)")
    p.add_argument("--chunk-mib", type=float, default=None,
                   help=f"target inner chunk size, the read unit (default {DEFAULT_CHUNK_MIB:g}, or what a cache at --out has)")
    p.add_argument("--shard-mib", type=float, default=None,
                   help=f"target shard size, the write unit, one file (default {DEFAULT_SHARD_MIB:g}, or what a cache at --out has)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8", "int8"],
                   help="stored precision: bf16 bits, fp8 e4m3 with per-token scales, or int8 with outlier channels in bf16")
    p.add_argument("--outlier-channels", type=int, default=4, help="int8: channels per layer kept in bf16")
    p.add_argument("--importance", default="fisher", choices=["fisher", "magnitude", "none"], help="importance scores for pruned init")
    p.add_argument("--fisher-samples", type=int, default=1024, help="training examples for Fisher importance")
    p.add_argument("--overwrite", action="store_true", help="replace a complete or different cache at --out")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("max_length", "max_target_length", "batch_size", "fisher_samples"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be positive, got {args.limit}")
    if args.precision == "int8" and args.outlier_channels <= 0:
        raise UserError(f"--outlier-channels must be positive for int8, got {args.outlier_channels}")
    chunk_mib, shard_mib = geometry_mib(args)
    if chunk_mib <= 0 or shard_mib < chunk_mib:
        raise UserError("--chunk-mib must be positive and --shard-mib at least --chunk-mib")
    return args


def parse_data_files(items: list[str]) -> dict[str, Path]:
    files = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or split not in SPLITS or not path:
            raise UserError(f"--data {item!r} must look like train=PATH (splits: {', '.join(SPLITS)})")
        files[split] = Path(path)
    return files


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


def geometry_mib(args: argparse.Namespace) -> tuple[float, float]:
    """--chunk-mib and --shard-mib, defaults filled in (the flags stay None when not given)."""
    return (DEFAULT_CHUNK_MIB if args.chunk_mib is None else args.chunk_mib,
            DEFAULT_SHARD_MIB if args.shard_mib is None else args.shard_mib)


def existing_manifest(out: Path) -> dict | None:
    """The manifest of a readable cache at `out`, or None (no cache there, a damaged manifest)."""
    try:
        return read_manifest(out) if (out / MANIFEST).is_file() else None
    except UserError:
        return None


def existing_geometry(manifest: dict | None, default: dict) -> dict:
    """The (chunk, shard) tokens per stack of an existing cache's `manifest` with the same stacks;
    `default` otherwise (no cache, another model family). Any other difference is still caught
    by the plan fingerprint."""
    if manifest is None or not manifest.get("splits"):
        return default
    found = {}  # a stack's geometry from any split that has it (train has no candidates stack)
    for split_meta in manifest["splits"].values():
        for stack, meta in split_meta["stacks"].items():
            found.setdefault(stack, (int(meta["chunk_tokens"]), int(meta["shard_tokens"])))
    if "candidates" in default and "candidates" not in found and "decoder" in found:
        found["candidates"] = found["decoder"]  # the same layers and width, so the same geometry
    if set(found) != set(default):
        return default
    return {stack: found[stack] for stack in default}


def existing_codec(manifest: dict | None, default: str) -> str:
    """The codec of an existing cache's `manifest`, else `default` (as `existing_geometry`)."""
    codec = (manifest or {}).get("storage", {}).get("codec")
    return codec if codec in CODECS else default


def plan_fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class Extraction:
    """One extraction run into one cache folder."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = pick_device(args.device)
        self.spec, all_splits = load_task(
            args.task,
            parse_data_files(args.data),
            [f for f in args.text_fields.split(",") if f],
            args.label_field,
            args.label_kind,
        )
        wanted = [s for s in args.splits.split(",") if s]
        missing = [s for s in wanted if s not in all_splits]
        if not wanted or missing:
            raise UserError(f"split {missing[0] if missing else '(none)'!r} is not in the data; available: {', '.join(all_splits)} "
                            f"(pass --splits {','.join(all_splits)})")
        self.splits = {s: all_splits[s][: args.limit] if args.limit else all_splits[s] for s in wanted}
        for split, examples in self.splits.items():
            if not examples:
                raise UserError(f"split {split!r} holds no examples; check the data")
        self.backbone: Backbone = load_backbone(args.model, self.device, revision=args.revision, trust_remote_code=args.trust_remote_code)
        self.info = self.backbone.info()
        self.layers = {"encoder": parse_layers(args.layers, self.backbone.layer_count("encoder"))}
        self.candidate_ids = None
        if self.backbone.family == "t5":
            self.layers["decoder"] = parse_layers(args.layers, self.backbone.layer_count("decoder"))
            self.layers["candidates"] = self.layers["decoder"]
            self.candidate_ids = self.backbone.tokenize_targets(self.spec.candidates(), args.max_target_length)
        self.plans: dict[str, SplitPlan] = {}
        for split, examples in self.splits.items():
            candidates = self.candidate_ids if split != "train" else None
            self.plans[split] = plan_split(
                split, examples, self.spec, self.backbone, args.max_length, args.max_target_length, args.batch_size, candidates
            )
        self.geometry = {stack: stack_geometry(len(layers), self.info.d_model, *geometry_mib(args))
                         for stack, layers in self.layers.items()}
        # same command, same cache: a cache at --out made under earlier defaults keeps its geometry and codec
        # (2 MiB chunks and zstd1 before 2026-11-27); --overwrite rebuilds with the current defaults
        existing = None if args.overwrite else existing_manifest(Path(args.out))
        if args.chunk_mib is None and args.shard_mib is None:
            self.geometry = existing_geometry(existing, self.geometry)
        if args.codec is None:
            args.codec = existing_codec(existing, DEFAULT_CODEC)

    # --- manifest -------------------------------------------------------------------------

    def identity(self) -> dict:
        """Everything that decides the cache's bits; a resume must match it exactly."""
        return {
            "model": self.info.to_json(),
            "task": self.spec.to_json(),
            "splits": {s: [ex.example_id for ex in p.examples[:3]] + [p.num_examples] for s, p in self.plans.items()},
            "max_length": self.args.max_length,
            "max_target_length": self.args.max_target_length,
            "batch_size": self.args.batch_size,
            "layers": self.layers,
            "codec": self.args.codec,
            "precision": [self.args.precision, self.args.outlier_channels if self.args.precision == "int8" else 0],
            "geometry": self.geometry,
            "compute_dtype": str(self.backbone.dtype).removeprefix("torch."),
        }

    def new_manifest(self) -> dict:
        splits = {}
        for split, plan in self.plans.items():
            stacks = {}
            for stack, offsets in plan.offsets.items():
                chunk, shard = self.geometry[stack]
                tokens = int(offsets[-1])
                stacks[stack] = {
                    "num_sequences": len(offsets) - 1,
                    "num_tokens": tokens,
                    "layers": self.layers[stack],
                    "chunk_tokens": chunk,
                    "shard_tokens": shard,
                    "num_shards": max(1, -(-tokens // shard)),
                    "shards_done": 0,
                    "precision": self.args.precision,
                }
            splits[split] = {"num_examples": plan.num_examples, "stacks": stacks, "complete": False}
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": False,
            "plan_fingerprint": plan_fingerprint(self.identity()),
            "model": self.info.to_json(),
            "task": self.spec.to_json(),
            "candidates": self.spec.candidates() if self.backbone.family == "t5" else None,
            "max_length": self.args.max_length,
            "max_target_length": self.args.max_target_length,
            "batch_size": self.args.batch_size,
            "limit": self.args.limit,
            "compute_dtype": str(self.backbone.dtype).removeprefix("torch."),
            "storage": {"logical_dtype": "bfloat16", "zarr_dtype": {"bf16": "uint16", "fp8": "uint8", "int8": "int8"}[self.args.precision],
                        "codec": self.args.codec, "precision": self.args.precision,
                        "outlier_channels": self.args.outlier_channels if self.args.precision == "int8" else 0},
            "importance": None,
            "data_source": {
                "task": self.args.task,
                "data": {k: str(Path(v).resolve()) for k, v in parse_data_files(self.args.data).items()},
                "text_fields": self.args.text_fields,
                "label_field": self.args.label_field,
                "label_kind": self.args.label_kind,
            },
            "splits": splits,
            "created_by": f"backbone_cache {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # --- folder handling ------------------------------------------------------------------

    def prepare_folder(self) -> tuple[Path, dict, bool]:
        """Decide where to write; return (folder, manifest, swap_into_out_when_done)."""
        out = Path(self.args.out)
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
            if same and (not self.args.overwrite or not existing.get("complete")):
                # the same cache: resume it (also under --overwrite, whose first run may have been this one),
                # or nothing to do if it is complete; --overwrite rebuilds a complete one
                return out, existing, False
            if not self.args.overwrite:
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
        """Name the first setting in which an existing cache's manifest differs from these flags."""
        wanted = self.new_manifest()
        checks = [("model", lambda m: m["model"]), ("task", lambda m: m["task"]), ("--limit", lambda m: m["limit"]),
                  ("--splits", lambda m: sorted(m["splits"])),
                  ("examples", lambda m: {s: v["num_examples"] for s, v in m["splits"].items()}),
                  ("--max-length", lambda m: m["max_length"]), ("--max-target-length", lambda m: m["max_target_length"]),
                  ("--batch-size", lambda m: m["batch_size"]), ("--codec", lambda m: m["storage"]["codec"]),
                  ("--precision", lambda m: (m["storage"]["precision"], m["storage"].get("outlier_channels"))),
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
                    dtype={"bf16": "uint16", "fp8": "uint8", "int8": "int8"}[self.args.precision],
                    compressors=compressors(self.args.codec),
                    fill_value=0,
                    attributes={"logical_dtype": "bfloat16", "layers": layers, "layout": "[token, layer, d]",
                                "precision": self.args.precision},
                )
                self._quantization_arrays(sub, int(offsets[-1]), len(layers), chunk, shard)
                self._small_array(sub, "offsets", offsets)
                ids, labels = self.token_arrays(plan, stack)
                self._small_array(sub, "input_ids", ids)
                if labels is not None:
                    self._small_array(sub, "labels", labels)
                if stack == "encoder" and plan.token_type_ids is not None:
                    self._small_array(sub, "token_type_ids", np.concatenate([np.asarray(t, np.int32) for t in plan.token_type_ids]))
            table = {
                "row": np.arange(plan.num_examples, dtype=np.int64),
                "example_id": [ex.example_id for ex in plan.examples],
                "dataset_index": plan.dataset_index,
                "label": [float(ex.label) for ex in plan.examples],
                "texts": [ex.texts for ex in plan.examples],
                "n_tokens": np.diff(plan.offsets["encoder"]),
            }
            if plan.target_ids is not None:
                table["target_text"] = [self.spec.target_text(ex.label) for ex in plan.examples]
            pq.write_table(pa.table(table), folder / split / "examples.parquet")
        write_json_atomic(folder / MANIFEST, self.manifest)
        return folder

    def _quantization_arrays(self, group, tokens: int, layers: int, chunk: int, shard: int) -> None:
        """fp8/int8: per-token scales, and for int8 the bf16 outlier channels and their per-shard index."""
        if self.args.precision == "bf16":
            return
        group.create_array("scale", shape=(tokens, layers), chunks=(chunk, 1), shards=(shard, layers), dtype="float32",
                           compressors=compressors(self.args.codec), fill_value=0)
        if self.args.precision == "int8":
            k = self.args.outlier_channels
            group.create_array("outliers", shape=(tokens, layers, k), chunks=(chunk, 1, k), shards=(shard, layers, k),
                               dtype="uint16", compressors=compressors(self.args.codec), fill_value=0)
            group.create_array("outlier_index", shape=(max(1, -(-tokens // shard)), layers, k), chunks=(1, layers, k),
                               dtype="int32", fill_value=0)

    def shard_encoder(self, group):
        """The function the writer applies to each finished shard (None for bf16)."""
        from shared import quantize

        if self.args.precision == "fp8":
            return lambda bits, index: quantize.encode_fp8(bits)

        def encode_int8(bits, index):
            outlier_index = quantize.choose_outliers(bits, self.args.outlier_channels)
            group["outlier_index"][index] = outlier_index
            return quantize.encode_int8(bits, outlier_index)

        return encode_int8 if self.args.precision == "int8" else None

    @staticmethod
    def _small_array(group, name: str, values: np.ndarray) -> None:
        values = np.asarray(values)
        array = group.create_array(name, shape=values.shape, chunks=(max(1, min(len(values), 1 << 20)),), dtype=values.dtype, fill_value=0)
        array[:] = values

    def token_arrays(self, plan: SplitPlan, stack: str) -> tuple[np.ndarray, np.ndarray | None]:
        """input_ids (and target labels) of a stack, concatenated in storage order."""
        if stack == "encoder":
            return np.concatenate([np.asarray(x, np.int32) for x in plan.source_ids]), None
        if stack == "decoder":
            labels = plan.target_ids
        else:
            labels = self.candidate_ids * plan.num_examples
        inputs = [self.backbone.shift_right(t) for t in labels]
        return np.concatenate([np.asarray(x, np.int32) for x in inputs]), np.concatenate([np.asarray(x, np.int32) for x in labels])

    # --- the forward loop -----------------------------------------------------------------

    def forward_batch(self, plan: SplitPlan, rows: range) -> dict[str, torch.Tensor]:
        """Run one batch; return each stack's unpadded states [tokens, layers, d] in storage order."""
        device = self.device
        sources = [plan.source_ids[i] for i in rows]
        ids, mask = pad(sources, device)
        types = pad([plan.token_type_ids[i] for i in rows], device)[0] if plan.token_type_ids is not None else None
        states, final = self.backbone.encode(ids, mask, types)
        out = {"encoder": unpad(states, mask, self.layers["encoder"])}
        if self.backbone.family == "t5":
            targets = [plan.target_ids[i] for i in rows]
            dec_ids, dec_mask = pad([self.backbone.shift_right(t) for t in targets], device)
            dec_states = self.backbone.decode(dec_ids, dec_mask, final, mask)
            out["decoder"] = unpad(dec_states, dec_mask, self.layers["decoder"])
            if "candidates" in plan.offsets:
                k = len(self.candidate_ids)
                cand_ids, cand_mask = pad([self.backbone.shift_right(c) for c in self.candidate_ids] * len(rows), device)
                cand_states = self.backbone.decode(
                    cand_ids, cand_mask, final.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
                )
                out["candidates"] = unpad(cand_states, cand_mask, self.layers["candidates"])
        return out

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
        """Put a complete rebuilt cache at --out in place of the old one."""
        out = Path(self.args.out)
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
        first_batch = len(plan.batches)
        for stack, writer in writers.items():
            if writer.done:
                continue
            sequence = int(np.searchsorted(plan.offsets[stack], writer.committed, side="right") - 1)
            example = sequence // len(self.candidate_ids) if stack == "candidates" else sequence
            first_batch = min(first_batch, example // self.args.batch_size)
        done_examples = plan.batches[first_batch].start if first_batch < len(plan.batches) else plan.num_examples
        bar = tqdm(total=plan.num_examples, initial=done_examples, desc=f"extract {plan.name}", unit="ex", disable=self.args.quiet, dynamic_ncols=True)
        tokens_done, t0 = 0, time.perf_counter()
        try:
            for rows in plan.batches[first_batch:]:
                states = self.forward_batch(plan, rows)
                for stack, writer in writers.items():
                    k = len(self.candidate_ids) if stack == "candidates" else 1
                    writer.write(int(plan.offsets[stack][rows.start * k]), states[stack])
                tokens_done += int(plan.offsets["encoder"][rows.stop] - plan.offsets["encoder"][rows.start])
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

    def fisher_missing(self, manifest: dict) -> bool:
        """Fisher scores are asked for and the cache lacks them (or has them over another sample count)."""
        if self.args.importance != "fisher" or "train" not in self.plans:
            return False
        have = manifest.get("importance") or {}
        return have.get("kind") != "fisher" or have.get("samples") != min(self.args.fisher_samples, self.plans["train"].num_examples)

    def store_importance(self, folder: Path) -> None:
        if self.args.importance == "none" or "train" not in self.plans:
            return
        from backbone_cache.importance import compute_importance, save_importance

        scores = compute_importance(
            self.backbone, self.spec, self.plans["train"], self.args.importance, self.args.fisher_samples, quiet=self.args.quiet
        )
        save_importance(folder / "importance.safetensors", scores, self.args.importance)
        self.manifest["importance"] = {"kind": self.args.importance, "file": "importance.safetensors",
                                       "samples": min(self.args.fisher_samples, self.plans["train"].num_examples)}


def pad(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; return ids and the attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def unpad(states: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """[B, L, all layers, d] -> [sum of lengths, kept layers, d], padding dropped; a view when nothing is dropped."""
    if layers != list(range(states.shape[2])):
        states = states[:, :, layers]
    flat, keep = states.flatten(0, 1), mask.flatten().bool()
    return flat if bool(keep.all()) else flat[keep]


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extraction = Extraction(args)
    folder = extraction.run()
    m = extraction.manifest
    total = sum(s["num_tokens"] for sp in m["splits"].values() for s in sp["stacks"].values())
    print(f"cache ready: {folder} ({len(m['splits'])} splits, {total:,} stored token-states per stack summed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
