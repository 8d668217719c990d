"""Reading single tensors from a model's safetensors files (never the whole model)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.backbones import resolve_model_path
from shared.errors import UserError


def _model_files(name: str | None, revision: str | None) -> list[Path]:
    """The safetensors files of a model folder or hub model (the index's files when there is one)."""
    path = Path(resolve_model_path(name))
    if path.is_dir():
        return sorted(path.glob("*.safetensors"))
    from huggingface_hub import hf_hub_download

    try:
        index = Path(hf_hub_download(str(name), "model.safetensors.index.json", revision=revision))
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except Exception:  # no index: one file
        files = ["model.safetensors"]
    try:
        return [Path(hf_hub_download(str(name), f, revision=revision)) for f in files]
    except Exception as err:
        raise UserError(f"could not fetch the safetensors of {name!r} ({type(err).__name__}); check the name and the network") from None


def load_tensor(name: str | None, revision: str | None, tensor_names: list[str]) -> torch.Tensor:
    """The first of `tensor_names` found in the model's safetensors, as float32 on the CPU."""
    from safetensors import safe_open

    files = _model_files(name, revision)
    for wanted in tensor_names:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                if wanted in handle.keys():
                    return handle.get_tensor(wanted).float()
    raise UserError(f"the safetensors of {name!r} hold none of {', '.join(tensor_names)}; is it the backbone this side model was trained on?")
