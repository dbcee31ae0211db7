"""Tile sizes for the flash-attention kernels, per backend, head_dim and length.

A small hand-filled table (see ``experiments/bench_attention.py`` for the measurements it
rests on). ``block_sizes`` shrinks the tiles for short sequences so tiny calls (tests, decode)
do not pad to a full tile.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the forward (``bq`` x ``bk``) and of the two backward kernels.

    ``warps``/``stages`` are Triton launch parameters (ignored on TPU).
    """

    bq: int
    bk: int
    bwd_bq_dq: int
    bwd_bk_dq: int
    bwd_bq_dkv: int
    bwd_bk_dkv: int
    warps: int = 4
    stages: int = 2
    bwd_warps: int = 4
    bwd_stages: int = 2

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{field.name}: must be a positive int, got {value!r}")
        for name in ("bq", "bk", "bwd_bq_dq", "bwd_bk_dq", "bwd_bq_dkv", "bwd_bk_dkv"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"BlockSizes.{name}: must be a power of two, got {value}")


# (max head_dim, tiles) rows per backend; the first row whose head_dim bound fits is used.
# GPU rows: best of the sweeps (H200, jax 0.11.2, causal bf16, B=2, L=8192, H*D=2048):
# forward tiles in experiments/results/tune_attention.json, backward tiles in
# bench_attention.json ("backward_sweep"); the D=256 row is a register-budget guess (untuned).
# TPU rows: untuned defaults (no TPU was available), 512-wide tiles as usual for Mosaic TPU.
TABLE: dict[str, list[tuple[int, BlockSizes]]] = {
    "gpu": [
        (64, BlockSizes(64, 64, 64, 64, 64, 64, warps=4, stages=3, bwd_warps=4, bwd_stages=3)),
        (128, BlockSizes(128, 64, 64, 64, 64, 64, warps=8, stages=3, bwd_warps=4, bwd_stages=2)),
        (256, BlockSizes(64, 32, 64, 32, 32, 64, warps=8, stages=2, bwd_warps=8, bwd_stages=1)),
    ],
    "tpu": [
        (256, BlockSizes(512, 512, 512, 512, 512, 512)),
    ],
}

MIN_TILE = {"gpu": 16, "tpu": 8}


def _fit(tile: int, length: int, floor: int) -> int:
    """Largest power of two <= ``tile`` that does not exceed ``length`` rounded up (>= floor)."""
    while tile > floor and tile // 2 >= length:
        tile //= 2
    return max(tile, floor)


def block_sizes(backend: str, q_len: int, kv_len: int, head_dim: int) -> BlockSizes:
    """Tiles for one call: the table row for ``backend``/``head_dim``, shrunk to the lengths."""
    if backend not in TABLE:
        raise ValueError(f"block_sizes: backend must be one of {sorted(TABLE)}, got {backend!r}")
    rows = TABLE[backend]
    base = next((bs for dmax, bs in rows if head_dim <= dmax), rows[-1][1])
    floor = MIN_TILE[backend]
    q_fields = ("bq", "bwd_bq_dq", "bwd_bq_dkv")
    changes = {
        name: _fit(getattr(base, name), q_len if name in q_fields else kv_len, floor)
        for name in ("bq", "bk", "bwd_bq_dq", "bwd_bk_dq", "bwd_bq_dkv", "bwd_bk_dkv")
    }
    return dataclasses.replace(base, **changes)
