"""Typed settings shared by both phases: which backbone, and which data cut how."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.errors import UserError
from shared.tasks import Example, TaskSpec, load_task, with_prompt


def index_list(text: str, flag: str) -> list[int]:
    """Comma-separated indices and inclusive ranges ("0,2,9-17") in the order given; a one-line error naming `flag`."""
    indices: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            first, dash, last = part.partition("-")
            if dash:
                a, b = int(first), int(last)
                if b < a:
                    raise ValueError
                indices.extend(range(a, b + 1))
            else:
                indices.append(int(part))
    except ValueError:
        raise UserError(f"{flag} {text!r} must be indices and ranges, e.g. 0,2,9-17") from None
    return indices


@dataclass
class ModelConfig:
    """A backbone: a hub name or a folder (None: the embedded default).

    `gguf_file`: a GGUF file in the folder `name`; `shared.cli.model_config` resolves it into
    the safetensors folder converted from it (`shared.backbones.gguf_folder`), which `name` then is."""

    name: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None


@dataclass
class DataConfig:
    """A task and how its examples are cut (the same settings in extract, run, sweep and compare)."""

    task: str | None = None  # GLUE name, "local", or None (the embedded default)
    data: dict[str, str] = field(default_factory=dict)  # local files: split -> path
    text_fields: list[str] = field(default_factory=list)
    label_field: str = "label"
    label_kind: str | None = None  # "class", "regression", or None: from the label column
    max_length: int = 128  # source tokens per example
    max_target_length: int = 128  # target tokens per example (T5)
    limit: int | None = None  # first N examples of each split
    prompt: str = ""  # decoder backbones: a prompt template, "{field}" per text field ("": the task's own)
    label_words: list[str] = field(default_factory=list)  # decoder backbones: one word per class ([]: the task's own)

    def check(self) -> None:
        for name in ("max_length", "max_target_length"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be positive, got {self.limit}")

    def load(self) -> tuple[TaskSpec, dict[str, list[Example]]]:
        """The task and its splits, each cut at `limit`."""
        self.check()
        spec, splits = load_task(self.task, {k: Path(v) for k, v in self.data.items()}, self.text_fields, self.label_field,
                                 self.label_kind)
        spec = with_prompt(spec, self.prompt, self.label_words)
        if self.limit:
            splits = {s: examples[: self.limit] for s, examples in splits.items()}
        return spec, splits

    def to_json(self) -> dict:
        out = asdict(self)
        out["data"] = {k: str(Path(v).resolve()) for k, v in self.data.items()}
        for name in ("prompt", "label_words"):  # only when set: a default task keeps its earlier fingerprint
            if not out[name]:
                del out[name]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> DataConfig:
        return cls(**obj)  # a run folder from before --prompt has neither key: the task's own template
