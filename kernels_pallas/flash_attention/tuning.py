"""Launch parameters of the flash-attention kernels.

Small hand-filled tables (see ``experiments/bench_attention.py`` for the measurements they rest
on). ``block_sizes`` shrinks the attention tiles for short sequences so tiny calls (tests,
decode) do not pad to a full tile; ``heads_per_wave`` orders the Hopper kernels' CTAs.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the forward (``bq`` x ``bk``) and of the two backward kernels.

    ``warps``/``stages`` are Triton launch parameters (ignored on TPU). With the Mosaic GPU
    forward (``lowering="mosaic"``) ``bq`` is 128 (two 64-row consumer warpgroups), ``bk`` is 64
    or 128 and ``stages`` is the number of KV buffers in flight; the backward fields still
    describe the Triton backward kernels.
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


@dataclasses.dataclass(frozen=True)
class MosaicForward:
    """Mosaic GPU forward (``mosaic_gpu_fwd.py``, Hopper): ``bk`` KV rows per tile, ``stages`` KV
    buffers in flight, ``pingpong``: consumers take turns on the tensor cores."""

    bk: int
    stages: int
    pingpong: bool = False


# (max head_dim, MosaicForward); query tile 128. D=128: 2 buffers = 160 KiB of the 227 KiB of
# shared memory, D=64: 4 = 160 KiB. Picked among experiments/bench_attention.py --variants
# (experiments/results/bench_attention_variants.md): pingpong was faster at D=128 and made no
# difference at D=64; persistent CTAs (one per SM) were slower for both and are gone.
MOSAIC_TABLE: list[tuple[int, MosaicForward]] = [
    (64, MosaicForward(bk=128, stages=4)),
    (128, MosaicForward(bk=128, stages=2, pingpong=True)),
]
MOSAIC_BQ = 128
# head_dims where lowering="mosaic" was measured faster than "triton" on Hopper (picked by
# ``gpu_lowering``): Mosaic is ahead in every cell of experiments/results/bench_attention.md
# (an H200) and of bench_attention_mosaic.md (an H100), forward and fwd+bwd, both head dims.
MOSAIC_FASTER_HEAD_DIMS: frozenset[int] = frozenset({64, 128})


def heads_per_wave(tiles: int, heads: int, wave: int | None = None) -> int:
    """How many of ``heads`` (batch x head pairs, ``tiles`` CTAs each) the flash-attention GPU
    kernels (Hopper and Triton) interleave in their launch order
    (``flash_attention._common.work_item``): the largest divisor of ``heads`` whose tiles fit
    one wave of ``wave`` CTAs (``Geometry.wave``; default one per SM: the device's count, an
    H100's 132 off the GPU; ``experiments/bench_launch_order.py`` varies it). Against one
    head at a time and all heads at once, it was faster for the Hopper kernels
    (experiments/results/bench_launch_order.md) and the Triton forward, the other Triton cells
    within noise (bench_launch_order_triton.md)."""
    sms = wave or getattr(jax.devices()[0], "core_count", None) or 132
    cap = max(1, sms // tiles)
    return max(g for g in range(1, min(cap, heads) + 1) if heads % g == 0)


def _fit(tile: int, length: int, floor: int) -> int:
    """Largest power of two <= ``tile`` that does not exceed ``length`` rounded up (>= floor)."""
    while tile > floor and tile // 2 >= length:
        tile //= 2
    return max(tile, floor)


def block_sizes(
    backend: str, q_len: int, kv_len: int, head_dim: int, lowering: str = "triton"
) -> BlockSizes:
    """Tiles for one call: the table row for ``backend``/``head_dim``, shrunk to the lengths;
    with ``lowering="mosaic"`` the forward fields come from ``MOSAIC_TABLE``."""
    if backend not in TABLE:
        raise ValueError(f"block_sizes: backend must be one of {sorted(TABLE)}, got {backend!r}")
    rows = TABLE[backend]
    base = next((bs for dmax, bs in rows if head_dim <= dmax), rows[-1][1])
    floor = {name: MIN_TILE[backend] for name in ("bq", "bk", "bwd_bq_dq", "bwd_bk_dq",
                                                 "bwd_bq_dkv", "bwd_bk_dkv")}  # fmt: skip
    if lowering == "mosaic":
        row = mosaic_forward(head_dim)
        base = dataclasses.replace(base, bq=MOSAIC_BQ, bk=row.bk, stages=row.stages)
        floor.update(bq=MOSAIC_BQ, bk=64)
    q_fields = ("bq", "bwd_bq_dq", "bwd_bq_dkv")
    changes = {
        name: _fit(getattr(base, name), q_len if name in q_fields else kv_len, lo)
        for name, lo in floor.items()
    }
    return dataclasses.replace(base, **changes)


def mosaic_forward(head_dim: int) -> MosaicForward:
    """The Mosaic GPU forward's row for ``head_dim``."""
    return next((row for dmax, row in MOSAIC_TABLE if head_dim <= dmax), MOSAIC_TABLE[-1][1])


def gpu_lowering(device_kind: str, head_dim: int, mosaic_ok: bool) -> str:
    """Forward lowering of a GPU call: ``"mosaic"`` on Hopper (H100/H200) where the call is
    supported (``mosaic_ok``) and measured faster (``MOSAIC_FASTER_HEAD_DIMS``), else
    ``"triton"``."""
    hopper = any(name in device_kind for name in ("H100", "H200", "H800", "GH200"))
    fast = head_dim in MOSAIC_FASTER_HEAD_DIMS
    return "mosaic" if hopper and mosaic_ok and fast else "triton"
