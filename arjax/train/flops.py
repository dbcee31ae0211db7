"""Model FLOPs per training step and MFU against the accelerator's datasheet peak.

MFU = model FLOPs per second / the chip's dense bf16 peak as its vendor publishes it (the
convention of PaLM, Chowdhery et al. 2022, App. B, and of MaxText / NVIDIA's recipes). Model
FLOPs are 3x the forward count of the config's own formula (forward + backward, no remat
recompute). A device whose peak is not in :data:`PEAK_FLOPS` gets no MFU (``None``), never
a guessed one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Dense (no 2:4 sparsity) bf16 peak FLOP/s per chip, matched against ``device.device_kind``
# (first match wins: the specific variants precede the family names). Sources:
# NVIDIA H100 datasheet (SXM 989.4, PCIe 756, NVL 835 TFLOP/s: the tables' "with sparsity"
# figures halved), NVIDIA H200 datasheet (SXM 989, NVL 835), NVIDIA A100 datasheet (312);
# Google Cloud TPU system architecture pages: v4 275, v5e 197, v5p 459, v6e (Trillium) 918.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)
# Kinds that are exactly a family name whose longer variants differ (JAX calls v5p "TPU v5").
_EXACT_PEAK_FLOPS = {"tpu v5": 459e12}


def peak_flops(device_or_kind: Any) -> float | None:
    """Datasheet dense bf16 FLOP/s of a device (or a ``device_kind`` string); None if unknown."""
    kind = device_or_kind if isinstance(device_or_kind, str) else device_or_kind.device_kind
    kind = kind.strip().lower()
    if kind in _EXACT_PEAK_FLOPS:
        return _EXACT_PEAK_FLOPS[kind]
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind:
            return flops
    return None


def forward_flops(model_cfg: Any, batch: dict) -> float | None:
    """Forward model FLOPs of one (host) batch, or None when the config has no formula.

    A config with ``batch_flops(batch)`` counts from the batch's content (HAT: its real
    bytes and words); otherwise ``flops_per_token(seq) x batch x seq``.
    """
    if hasattr(model_cfg, "batch_flops"):
        return float(model_cfg.batch_flops(batch))
    per_token = getattr(model_cfg, "flops_per_token", None)
    if per_token is None:
        return None
    rows, seq = np.shape(batch["targets"])[:2]
    return float(per_token(seq)) * rows * seq


def train_step_flops(model_cfg: Any, batch: dict) -> float | None:
    """Model FLOPs of one training step on ``batch`` (3x forward: forward + backward)."""
    fwd = forward_flops(model_cfg, batch)
    return None if fwd is None else 3.0 * fwd


def mfu(
    flops: float | None, seconds: float, peak: float | None, num_devices: int = 1
) -> float | None:
    """``flops / seconds / (peak x num_devices)``; None without a FLOP count or a known peak."""
    if flops is None or peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * num_devices)
