"""`python -m side_train.predict`: load a trained side network and predict.

    python -m side_train.predict --run runs/lst --text "a gorgeous, witty film"      # live backbone
    python -m side_train.predict --run runs/lst --cache ./cache --split test --out p.csv
    python -m side_train.predict --run runs/sft --generate --text "Name a primary colour." --max-new-tokens 32
    python -m side_train.predict --run runs/sft --generate --text "..." --temperature 0.8 --top-p 0.9 --seed 1

`--generate` (decoder backbones) continues each --text with the live backbone and the side network,
both with their KV caches: an instruction-tuned run's text is the prompt as given; a label-word
run's text fields are rendered with its prompt template first. Greedy unless --temperature > 0.
An instruction-tuned run's --cache split gives each example's response loss.

Python API: `Predictor.from_run(run_dir).predict_texts([["a gorgeous, witty film"]])`,
`Predictor.from_run(run_dir).generate_texts(["Name a primary colour."], GenerationConfig())`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from backbone_cache.plan import plan_split
from shared.backbones import DEFAULT_MODEL, load_backbone, pick_device
from shared.cache_format import open_complete
from shared.cli import Parser
from shared.errors import UserError, cli_entry
from shared.families import Backbone
from shared.tasks import Example, TaskSpec
from side_train.data import CachedSplit, LiveSplit
from side_train.evaluate import predict
from side_train.model import GenerationConfig, SideNetwork, from_pretrained
from side_train.runs import stored_identity


class Predictor:
    """A trained side network, and (loaded when first needed) the frozen backbone it reads."""

    def __init__(self, model: SideNetwork, spec: TaskSpec, max_length: int = 128, max_target_length: int = 128,
                 device: str = "auto", backbone: Backbone | None = None):
        self.model, self.spec, self.max_length, self.max_target_length = model, spec, max_length, max_target_length
        self.device = pick_device(device)
        self._backbone = backbone
        self.model.to(self.device).eval()

    @classmethod
    def from_run(cls, run_dir: Path, device: str = "auto", best: bool = False) -> Predictor:
        """The side network of a run folder (its last or best-validation weights); a frozen LM head
        comes from the backbone's safetensors, the backbone itself only when texts are predicted."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} is not a run folder (no config.json); pass the --out of side_train.run")
        stored_identity(run_dir)  # a folder of another version is a one-line error
        config = json.loads((run_dir / "config.json").read_text())
        weights = run_dir / ("best_side_model" if best else "side_model")
        if not (weights / "model.safetensors").is_file():
            hint = "it has no validation split, or rerun its side_train.run command to finish it" if best else \
                "the run has not finished: rerun its side_train.run command to finish it, or pass --best"
            raise UserError(f"{weights} holds no side network; {hint}")
        inputs = config["inputs"]
        return cls(from_pretrained(weights), TaskSpec.from_json(config["identity"]["task"]), int(inputs["max_length"]),
                   int(inputs["max_target_length"]), device)

    @property
    def backbone(self) -> Backbone:
        """The frozen backbone the side model records (loaded on first use)."""
        if self._backbone is None:
            record = self.model.cfg.backbone
            name = None if record["name"] == DEFAULT_MODEL else record["name"]
            self._backbone = load_backbone(name, self.device, revision=record.get("revision"))
            if self._backbone.info().config_fingerprint != record["config_fingerprint"]:
                raise UserError(f"the model {record['name']!r} loaded now differs from the one the side model was trained on")
        return self._backbone

    def generate_texts(self, texts: list[str] | list[list[str]], settings: GenerationConfig | None = None) -> list[str]:
        """Generated continuations: an instruction-tuned run's prompts (strings), or a class task's inputs
        (lists of text fields, rendered with the run's prompt template)."""
        settings = settings or GenerationConfig()
        settings.check()
        if self.spec.label_kind == "lm":
            inputs = [[t if isinstance(t, str) else " ||| ".join(t)] for t in texts]
        else:
            inputs = [[t] if isinstance(t, str) else list(t) for t in texts]
            self._check_fields(inputs)
        return self.model.generate_texts(self.backbone, inputs, self.spec, self.max_length, settings)

    def _check_fields(self, texts: list[list[str]]) -> None:
        expected = len(self.spec.text_fields)
        for fields in texts:
            if len(fields) != expected:
                raise UserError(f"each input needs {expected} text field(s) ({', '.join(self.spec.text_fields)}), got {len(fields)}")

    def predict_texts(self, texts: list[list[str]]) -> list[str]:
        """Label names (or regression values as strings) for raw inputs, one list of fields per example."""
        if self.spec.label_kind == "lm":
            raise UserError("an instruction-tuned run generates its answers: add --generate")
        if not texts:
            return []
        self._check_fields(texts)
        examples = [Example(f"input-{i}", list(t), 0) for i, t in enumerate(texts)]
        plan = plan_split("input", examples, self.spec, self.backbone, self.max_length, self.max_target_length, 64,
                          with_candidates=True)
        layers = self.model.cfg.stack_layers()
        source = LiveSplit(self.backbone, plan, {s: layers[s] for s in self.model.eval_stacks})
        values = predict(self.model, source, self.spec, self.device, 64)
        in_input_order = np.empty_like(values)
        in_input_order[plan.dataset_index] = values
        return [self.label_name(v) for v in in_input_order]

    def predict_cache(self, cache: Path, split: str) -> list[dict]:
        """Predictions for a cached split (no backbone forward): rows of example_id, prediction, label."""
        manifest = open_complete(Path(cache))
        if manifest["model"]["config_fingerprint"] != self.model.cfg.backbone["config_fingerprint"]:
            raise UserError(f"cache {cache} was built from another model than this side model's")
        labels = lambda task: (task["name"], task["label_kind"], task["label_names"])  # noqa: E731
        if labels(manifest["task"]) != labels(self.spec.to_json()):
            raise UserError(f"cache {cache} holds task {manifest['task']['name']!r}, the run was trained on "
                            f"{self.spec.name!r}; predict from a cache of the run's task")
        prompt = lambda task: (task.get("prompt", ""), task.get("label_words", []))  # noqa: E731
        if prompt(manifest["task"]) != prompt(self.spec.to_json()):
            raise UserError(f"cache {cache} was extracted with another --prompt or --label-words than the run's "
                            "cache; predict from a cache of the run's template")
        if split not in manifest["splits"]:
            raise UserError(f"cache {cache} has no split {split!r}; choose one of {', '.join(manifest['splits'])}")
        missing = [s for s in self.model.eval_stacks if s not in manifest["splits"][split]["stacks"]]
        if missing:
            raise UserError(f"split {split!r} of cache {cache} holds no {missing[0]!r} states (they are kept for "
                            "evaluation splits only); choose another --split")
        layers = self.model.cfg.stack_layers()
        source = CachedSplit(Path(cache), manifest, split, {s: layers[s] for s in self.model.eval_stacks})
        values = predict(self.model, source, self.spec, self.device, 100)
        ids = source.examples.column("example_id").to_pylist()
        if self.spec.label_kind == "lm":  # each example's mean response-token cross-entropy (blank: no response tokens)
            return [{"example_id": i, "response_loss": "" if np.isnan(v) else f"{v:.4f}"} for i, v in zip(ids, values)]
        return [{"example_id": i, "prediction": self.label_name(v), "label": self.label_name(y)}
                for i, v, y in zip(ids, values, source.labels)]

    def label_name(self, value: float) -> str:
        if self.spec.label_kind == "regression":
            return f"{value:.3f}"
        return self.spec.label_names[int(value)] if value >= 0 else "<invalid>"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m side_train.predict", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder of side_train.run")
    p.add_argument("--best", action="store_true", help="use the best-validation weights instead of the last")
    p.add_argument("--text", action="append", default=[], help="an input; separate pair fields with ' ||| '")
    p.add_argument("--cache", default=None, help="predict a cached split instead (no backbone forward)")
    p.add_argument("--split", default="test", help="with --cache: the split")
    p.add_argument("--out", default=None, help="write a CSV of predictions here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", default="auto")
    g = p.add_argument_group("generation (--generate, decoder backbones)")
    g.add_argument("--generate", action="store_true", help="generate a continuation of each --text (live backbone)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample from softmax(logits / T)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens only (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens whose probability reaches p")
    g.add_argument("--seed", type=int, default=0, help="the sampling seed")
    g.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded, KV-cached)")
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out:
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise UserError(f"--out {out} must be a file in an existing folder")
        if out.exists() and not args.overwrite:
            raise UserError(f"--out {out} exists; choose another file or pass --overwrite to replace it")
    settings = GenerationConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.batch_size)
    settings.check()
    if args.generate and (args.cache or not args.text):  # before the model loads
        raise UserError("--generate continues texts: pass --text \"...\" (not --cache)")
    predictor = Predictor.from_run(Path(args.run), args.device, args.best)
    if args.generate:
        texts = args.text if predictor.spec.label_kind == "lm" else [t.split(" ||| ") for t in args.text]
        rows = [{"text": t, "generation": g} for t, g in zip(args.text, predictor.generate_texts(texts, settings))]
    elif args.cache:
        rows = predictor.predict_cache(Path(args.cache), args.split)
    elif args.text:
        texts = [t.split(" ||| ") for t in args.text]
        rows = [{"text": t, "prediction": p} for t, p in zip(args.text, predictor.predict_texts(texts))]
    else:
        raise UserError("nothing to predict: pass --text \"...\" or --cache DIR --split NAME")
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} predictions to {args.out}")
    else:
        for row in rows[:50]:
            print("\t".join(str(v) for v in row.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
