"""`python -m side_train.predict`: load a trained side network and predict.

    python -m side_train.predict --run runs/lst --text "a gorgeous, witty film"      # live backbone
    python -m side_train.predict --run runs/lst --cache ./cache --split test --out p.csv

Python API: `Predictor.from_run(run_dir).predict_texts([["a gorgeous, witty film"]])`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from shared.backbones import Backbone, load_backbone, pick_device
from shared.errors import UserError, cli_entry
from shared.tasks import Example, TaskSpec
from side_train.data import CachedSplit, LiveSplit
from side_train.evaluate import predict
from side_train.model import LadderSideNetwork


class Predictor:
    """A trained side network with the frozen backbone it reads."""

    def __init__(self, model: LadderSideNetwork, backbone: Backbone, spec: TaskSpec, max_length: int = 128, max_target_length: int = 128):
        self.model, self.backbone, self.spec = model, backbone, spec
        self.max_length, self.max_target_length = max_length, max_target_length

    @classmethod
    def from_run(cls, run_dir: Path, device: str = "auto", best: bool = False) -> Predictor:
        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise UserError(f"{run_dir} is not a run folder (no config.json); pass the --out of side_train.run")
        config = json.loads(config_path.read_text())
        identity = config["identity"]
        inputs = config.get("inputs") or _input_lengths_of_older_runs(identity, config.get("argv", {}))
        name = identity["model"]["name"]
        backbone = load_backbone(name, pick_device(device), revision=identity["model"].get("revision"))
        lm_head = backbone.lm_head()[0].detach().float().cpu() if backbone.family == "t5" else None
        weights = run_dir / ("best_side_model" if best else "side_model")
        if not (weights / "model.safetensors").is_file():
            hint = "it has no validation split, or rerun its side_train.run command to finish it" if best else \
                "the run has not finished: rerun its side_train.run command to finish it, or pass --best"
            raise UserError(f"{weights} holds no side network; {hint}")
        model = LadderSideNetwork.from_pretrained(weights, lm_head)
        return cls(model.to(backbone.device).eval(), backbone, TaskSpec.from_json(identity["task"]),
                   int(inputs.get("max_length", 128)), int(inputs.get("max_target_length", 128)))

    def predict_texts(self, texts: list[list[str]]) -> list[str]:
        """Label names (or regression values as strings) for raw inputs, one list of fields per example."""
        from backbone_cache.plan import plan_split

        if not texts:
            return []
        expected = len(self.spec.text_fields)
        for fields in texts:
            if len(fields) != expected:
                raise UserError(f"each input needs {expected} text field(s) ({', '.join(self.spec.text_fields)}), got {len(fields)}")
        examples = [Example(f"input-{i}", list(t), 0) for i, t in enumerate(texts)]
        candidates = self.backbone.tokenize_targets(self.spec.candidates(), self.max_target_length) if self.backbone.family == "t5" else None
        plan = plan_split("input", examples, self.spec, self.backbone, self.max_length, self.max_target_length, 64, candidates)
        source = LiveSplit(self.backbone, plan, candidates, self.model.cfg.encoder_layers, self.model.cfg.decoder_layers)
        values = predict(self.model, source, self.spec, self.backbone.device, 64)
        in_input_order = np.empty_like(values)
        in_input_order[plan.dataset_index] = values
        return [self.label_name(v) for v in in_input_order]

    def label_name(self, value: float) -> str:
        if self.spec.label_kind == "regression":
            return f"{value:.3f}"
        return self.spec.label_names[int(value)] if value >= 0 else "<invalid>"


def _input_lengths_of_older_runs(identity: dict, argv: dict) -> dict:
    """Run folders written before config.json recorded `inputs`: a cached run's lengths are its
    cache's (when it is still there), a live run's its flags."""
    cache = identity.get("cache")
    if cache and (Path(cache) / "manifest.json").is_file():
        try:
            return json.loads((Path(cache) / "manifest.json").read_text())
        except ValueError:
            pass
    return argv


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m side_train.predict", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder of side_train.run")
    p.add_argument("--best", action="store_true", help="use the best-validation weights instead of the last")
    p.add_argument("--text", action="append", default=[], help="an input; separate pair fields with ' ||| '")
    p.add_argument("--cache", default=None, help="predict a cached split instead (no backbone forward)")
    p.add_argument("--split", default="test", help="with --cache: the split")
    p.add_argument("--out", default=None, help="write a CSV of predictions here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from shared.cache_format import open_complete

    args = parse_args(argv)
    if args.out:
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise UserError(f"--out {out} must be a file in an existing folder")
        if out.exists() and not args.overwrite:
            raise UserError(f"--out {out} exists; choose another file or pass --overwrite to replace it")
    predictor = Predictor.from_run(Path(args.run), args.device, args.best)
    rows: list[dict] = []
    if args.cache:
        manifest = open_complete(Path(args.cache))
        if manifest["model"]["config_fingerprint"] != predictor.backbone.info().config_fingerprint:
            raise UserError(f"cache {args.cache} was built from another model than run {args.run}")
        labels = lambda task: (task["name"], task["label_kind"], task["label_names"])  # noqa: E731
        if labels(manifest["task"]) != labels(predictor.spec.to_json()):
            raise UserError(f"cache {args.cache} holds task {manifest['task']['name']!r}, run {args.run} was trained on "
                            f"{predictor.spec.name!r}; predict from a cache of the run's task")
        cfg = predictor.model.cfg
        if args.split not in manifest["splits"]:
            raise UserError(f"cache {args.cache} has no split {args.split!r}; choose one of {', '.join(manifest['splits'])}")
        if cfg.family == "t5" and "candidates" not in manifest["splits"][args.split]["stacks"]:
            raise UserError(f"split {args.split!r} of cache {args.cache} holds no candidate label states (T5 caches keep them "
                            "for validation and test only); choose another --split")
        source = CachedSplit(Path(args.cache), manifest, args.split, cfg.encoder_layers, cfg.decoder_layers)
        values = predict(predictor.model, source, predictor.spec, predictor.backbone.device, 100)
        ids = source.examples.column("example_id").to_pylist()
        rows = [{"example_id": i, "prediction": predictor.label_name(v), "label": predictor.label_name(y)}
                for i, v, y in zip(ids, values, source.labels)]
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
