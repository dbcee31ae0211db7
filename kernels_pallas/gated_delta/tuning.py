"""Launch parameters of the gated delta rule's Pallas Triton kernels: one frozen dataclass,
passed as a static argument (``gated_delta_rule(..., tuning=...)``) down to the kernels, as
:mod:`kernels_pallas.linear_attention_scan.tuning` does for the scan.

Defaults: 4 warps for every kernel, measured fastest for each on an H200, the gradient kernel
included although its offline sm_90 compile spills the most at 4
(``experiments/results/bench_gated_delta_grad_warps.md``); a gradient tile of dk x 128 value
columns at dk = 128, which compiles for sm_90 within shared memory with fewer spilled registers
than 64 columns and measured faster (``triton_sm90_gated_delta.md``, the same warps file).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TritonTuning:
    """``warps``: Triton warps of every kernel; ``kernel_warps``: ``(kernel name, warps)``
    pairs that override it for single kernels (e.g. ``("gated_delta_bwd", 8)``, the names of
    the ``pallas_call``\\ s); ``grad_tile``: the most ``dk x value columns`` of one gradient
    kernel program (:func:`.triton_bwd.grad_block_v`)."""

    warps: int = 4
    kernel_warps: tuple[tuple[str, int], ...] = ()
    grad_tile: int = 16384

    def __post_init__(self) -> None:
        counts = [("warps", self.warps)]
        counts += [(f"kernel_warps[{name!r}]", w) for name, w in self.kernel_warps]
        for name, value in counts:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TritonTuning.{name}: must be a positive int, got {value!r}")
            if value & (value - 1):
                raise ValueError(f"TritonTuning.{name}: must be a power of two, got {value}")
        tile = self.grad_tile
        if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
            raise ValueError(f"TritonTuning.grad_tile: must be a positive int, got {tile!r}")

    def warps_of(self, kernel: str) -> int:
        """The warps of the kernel named ``kernel``."""
        return dict(self.kernel_warps).get(kernel, self.warps)
