"""Command-line flags declared once for every command that takes them (argparse stays at the edge)."""

from __future__ import annotations

import argparse

from shared.config import DataConfig, ModelConfig
from shared.errors import UserError
from shared.tasks import parse_data_files

DATA_FLAGS = ("task", "data", "text_fields", "label_field", "label_kind", "max_length", "max_target_length", "limit",
              "prompt", "label_words")


def add_model_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, help_suffix: str = "") -> None:
    p.add_argument("--model", default=None, help=f"hub name or local folder (default: the embedded all-MiniLM-L6-v2){help_suffix}")
    p.add_argument("--revision", default=None, help="hub revision of --model")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="a GGUF file in the --model folder: converted once to a safetensors folder beside it, then loaded from there")


def add_data_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, help_suffix: str = "") -> None:
    p.add_argument("--task", default=None, help=f"GLUE task (sst2, mnli, ...), 'local', or rotten_tomatoes (default){help_suffix}")
    p.add_argument("--data", action="append", default=[], metavar="SPLIT=PATH", help="local data file (csv, jsonl, parquet)")
    p.add_argument("--text-fields", default="", help="local data: comma-separated text columns")
    p.add_argument("--label-field", default="label", help="local data: label column")
    p.add_argument("--label-kind", default=None, choices=["class", "regression"],
                   help="local data: class labels or regression targets (default: regression when the labels are "
                        "numbers that are not all integers, else classes)")
    p.add_argument("--max-length", type=int, default=128, help="source tokens kept per example")
    p.add_argument("--max-target-length", type=int, default=128, help="T5: target tokens kept per example")
    p.add_argument("--limit", type=int, default=None, help="keep the first N examples of each split")
    p.add_argument("--prompt", default="", metavar="TEMPLATE",
                   help="decoder backbones: the prompt, with {field} for each text field, e.g. 'Is this review positive "
                        "or negative?\\nReview: {sentence}\\nSentiment:' (\\n is a newline; the text after the last "
                        "field is the cue the label words follow; default: the task's own, in the README's decoder section)")
    p.add_argument("--label-words", default="", metavar="WORDS",
                   help="decoder backbones: comma-separated label words, one per class in label order, each "
                        "following the cue after a space (default: the task's own)")


def add_storage_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--storage-options", default=None, metavar="JSON",
                   help="a cache on object storage (s3://, gs://, any fsspec URL): fsspec options as a JSON object, e.g. "
                        "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (default: the usual environment, AWS_* or "
                        "GOOGLE_APPLICATION_CREDENTIALS)")


def storage_options(args: argparse.Namespace) -> dict:
    """The --storage-options JSON as a dict ({} when not given); bad JSON is a one-line UserError."""
    from shared.stores import parse_storage_options

    return parse_storage_options(getattr(args, "storage_options", None))


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The model flags; with --gguf-file the model is the safetensors folder converted from it (converted on first use)."""
    gguf_file = getattr(args, "gguf_file", None)
    if gguf_file is None:
        return ModelConfig(args.model, args.revision, args.trust_remote_code)
    from shared.backbones import gguf_folder

    return ModelConfig(str(gguf_folder(args.model, gguf_file)), args.revision, args.trust_remote_code, gguf_file)


def data_config(args: argparse.Namespace) -> DataConfig:
    config = DataConfig(task=args.task, data={k: str(v) for k, v in parse_data_files(args.data).items()},
                        text_fields=[f for f in args.text_fields.split(",") if f], label_field=args.label_field,
                        label_kind=args.label_kind, max_length=args.max_length, max_target_length=args.max_target_length,
                        limit=args.limit, prompt=getattr(args, "prompt", "").replace("\\n", "\n"),
                        label_words=getattr(args, "label_words", "").split(",") if getattr(args, "label_words", "") else [])
    config.check()
    return config


def data_flags_given(argv: list[str]) -> list[str]:
    """The data flags present in `argv` (a cached run takes its data from the cache and refuses them)."""
    flags = {f"--{name.replace('_', '-')}" for name in DATA_FLAGS}
    return sorted({a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in flags})


def positive(value: int | float | None, flag: str, allow_none: bool = True, allow_zero: bool = False) -> None:
    """A one-line error for a flag that must be positive (or non-negative with `allow_zero`)."""
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{flag} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


class Parser(argparse.ArgumentParser):
    """argparse whose complaints are one-line user errors (no usage block), without abbreviations."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")
