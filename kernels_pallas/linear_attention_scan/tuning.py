"""Launch parameters of the linear-attention scan: one frozen dataclass per lowering, passed
as a static argument (``chunked_linear_attention(..., tuning=...)``) down to the kernels.

Default rows: the Triton GLA row is the winner of the H100 sweeps
(``experiments/results/tune_scan_h100.md``, ``bench_scan_gla_h100.md``); scalar and no decay
keep the values of the first GPU runs (``experiments/results/bench_scan.md``) but for the
two-kernel backward (``bwd_parts=2``, measured faster with both gates:
``experiments/results/bench_scan_bwd_ab.md``). The TPU row is untuned (no TPU was available).
"""

from __future__ import annotations

import dataclasses


def _check(obj) -> None:
    """Every field a positive int; all but ``*stages`` powers of two; ``sub`` >= 16."""
    name = type(obj).__name__
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}.{field.name}: must be a positive int, got {value!r}")
        if value & (value - 1) and not field.name.endswith("stages"):
            raise ValueError(f"{name}.{field.name}: must be a power of two, got {value!r}")
    if obj.sub < 16:
        raise ValueError(f"{name}.sub: must be >= 16 (MMA tiles), got {obj.sub}")


@dataclasses.dataclass(frozen=True)
class TritonTuning:
    """Pallas Triton (``backend="gpu"``); ``bwd_*`` fields are the backward's.

    ``state_bk``/``state_bv``: state tile of one state-pass program (clipped to dk/dv);
    ``*warps``/``*stages``: Triton launch parameters of the state pass (``state_*``) and of the
    parallel chunk kernels; ``sub``: GLA sub-chunk rows (secondary chunking, clipped to the
    chunk); ``staged_tile``: dv columns of one GLA output program (``bwd_staged_tile``: of one
    dv program of the backward; ``bwd_staged_bk``: dk columns of one dq/dk program; clipped to
    the dims); ``bwd_parts``: 1, one backward chunk kernel for dq, dk and dv (no and scalar
    decay), or 2, one for dq and one for dk and dv (fewer live tiles each; GLA always splits).
    """

    state_bk: int = 64
    state_bv: int = 64
    state_warps: int = 4
    state_stages: int = 2
    warps: int = 4
    stages: int = 2
    bwd_state_bk: int = 64
    bwd_state_bv: int = 64
    bwd_state_warps: int = 4
    bwd_state_stages: int = 2
    bwd_warps: int = 4
    bwd_stages: int = 2
    sub: int = 16
    staged_tile: int = 64
    bwd_staged_tile: int = 64
    bwd_staged_bk: int = 64
    bwd_parts: int = 1

    def __post_init__(self) -> None:
        _check(self)
        if self.bwd_parts not in (1, 2):
            raise ValueError(f"TritonTuning.bwd_parts: must be 1 or 2, got {self.bwd_parts}")


@dataclasses.dataclass(frozen=True)
class MosaicTpuTuning:
    """Pallas Mosaic TPU (``backend="tpu"``): ``sub``, the GLA sub-chunk rows (clipped to the
    chunk). The state tile is the whole state (Mosaic blocks span full last dims)."""

    sub: int = 16

    def __post_init__(self) -> None:
        _check(self)


TRITON: dict[str, TritonTuning] = {
    "none": TritonTuning(bwd_parts=2),
    "scalar": TritonTuning(bwd_parts=2),
    "gated": TritonTuning(staged_tile=128, bwd_staged_tile=128),
}
MOSAIC_TPU = MosaicTpuTuning()


def default_tuning(backend: str, gate: str) -> TritonTuning | MosaicTpuTuning:
    """The row for ``backend`` ("gpu" | "tpu") and ``gate`` ("none" | "scalar" | "gated")."""
    return MOSAIC_TPU if backend == "tpu" else TRITON[gate]
