"""Compact storage precisions for cached states (extraction option `--precision`).

- `bf16`: bfloat16 bits (the default; exact to one bf16 rounding step).
- `fp8`: float8 e4m3 codes with one float32 scale per token and layer (absmax / 448).
- `int8`: int8 codes with one float32 scale per token and layer, after taking the
  `outliers` channels of largest magnitude out and keeping them in bfloat16. Per-token
  absmax int8 alone breaks on outlier channels: one huge channel sets the scale and the
  rest round to zero (LLM.int8, storage notes §4). The outlier channels are chosen per
  shard and layer from the shard's own states, so a resumed extraction chooses the same.

Every function maps numpy arrays [tokens, layers, d] to arrays and back; decoding always
returns bfloat16 bits (uint16), the type every reader consumes.
"""

from __future__ import annotations

import numpy as np
import torch

PRECISIONS = ("bf16", "fp8", "int8")
FP8_MAX = 448.0


def _bf16_to_float(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float()


def _float_to_bf16_bits(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def encode_fp8(bits: np.ndarray) -> dict[str, np.ndarray]:
    """bf16 bits [T, L, d] -> {"hidden": uint8 e4m3 codes, "scale": float32 [T, L]}."""
    x = _bf16_to_float(bits)
    scale = x.abs().amax(-1).clamp(min=1e-30) / FP8_MAX
    codes = (x / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return {"hidden": codes.view(torch.uint8).numpy(), "scale": scale.numpy().astype(np.float32)}


def decode_fp8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float()
    return _float_to_bf16_bits(x * torch.from_numpy(np.ascontiguousarray(scale)).unsqueeze(-1))


def choose_outliers(bits: np.ndarray, count: int) -> np.ndarray:
    """Per layer, the `count` channels with the largest absolute value: int32 [L, count], ascending."""
    x = _bf16_to_float(bits)
    peak = x.abs().amax(0)  # [L, d]
    return np.sort(torch.topk(peak, count, dim=-1).indices.numpy(), axis=-1).astype(np.int32)


def encode_int8(bits: np.ndarray, outlier_index: np.ndarray) -> dict[str, np.ndarray]:
    """bf16 bits [T, L, d] -> int8 codes (outlier channels zero), float32 scales [T, L], bf16 outliers [T, L, k]."""
    x = _bf16_to_float(bits)
    index = torch.from_numpy(outlier_index.astype(np.int64)).unsqueeze(0).expand(x.shape[0], -1, -1)
    outliers = torch.gather(x, 2, index)
    inliers = x.scatter(2, index, 0.0)
    scale = inliers.abs().amax(-1).clamp(min=1e-30) / 127.0
    codes = torch.round(inliers / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return {"hidden": codes.numpy(), "scale": scale.numpy().astype(np.float32), "outliers": _float_to_bf16_bits(outliers)}


def decode_int8(codes: np.ndarray, scale: np.ndarray, outliers: np.ndarray, outlier_index: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(codes)).float() * torch.from_numpy(np.ascontiguousarray(scale)).unsqueeze(-1)
    index = torch.from_numpy(outlier_index.astype(np.int64)).unsqueeze(0).expand(x.shape[0], -1, -1)
    return _float_to_bf16_bits(x.scatter(2, index, _bf16_to_float(outliers)))


def relative_error(reference_bits: np.ndarray, decoded_bits: np.ndarray, exclude: np.ndarray | None = None) -> float:
    """||x - x̂|| / ||x|| over all channels, or over the non-outlier channels when `exclude` [L, k] is given."""
    x, y = _bf16_to_float(reference_bits), _bf16_to_float(decoded_bits)
    if exclude is not None:
        keep = torch.ones(x.shape[1:], dtype=torch.bool)
        keep.scatter_(1, torch.from_numpy(exclude.astype(np.int64)), False)
        x, y = x[:, keep], y[:, keep]
    return float((x - y).norm() / x.norm().clamp(min=1e-30))
