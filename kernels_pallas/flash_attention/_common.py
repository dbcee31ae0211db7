"""Shared pieces of the flash-attention kernels: static geometry, block ranges, tile math.

Everything here is traced inside Pallas kernels (and index maps), so it only uses ops that
lower under both Triton and Mosaic TPU: integer min/max/div on non-negative scalars, iota,
compares, ``where``, ``exp2``. Logits are kept in base 2 (Dao 2023, FlashAttention-2, sec. 3.1):
``s2 = (q . k) * scale * log2(e)`` so that ``exp2(s2 - m2) == exp(s - m)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static description of one attention call after padding.

    ``q_len``/``kv_len`` are the true lengths (masks and causal offsets use them);
    ``bq``/``bk`` the tile sizes; ``nq``/``nk`` the tile counts of the padded arrays.
    Query ``i`` sits at position ``i + offset`` with ``offset = kv_len - q_len``.
    """

    q_len: int
    kv_len: int
    bq: int
    bk: int
    causal: bool
    window: int | None
    has_segments: bool
    scale: float
    groups: int
    wave: int | None = None  # CTAs per wave the GPU launch order plans for (None: SM count)

    @property
    def nq(self) -> int:
        return -(-self.q_len // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.kv_len // self.bk)

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def scale2(self) -> float:
        """Logit multiplier in base 2."""
        return self.scale * LOG2_E


def _div(a, b: int):
    """Floor division of a non-negative traced int by a positive constant."""
    return lax.div(a, jnp.int32(b))


def _clip(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _with_segments(bounds: tuple, geo: Geometry, segment_tiles) -> tuple:
    """Causal / window tile ``bounds`` ``(lo, full_lo, full_hi, hi)`` with segment ids: cut to
    the tile's ``segment_tiles`` (the same four, from :func:`segment_tile_ranges`), whose
    unmasked range is intersected; without them every tile is masked."""
    lo, full_lo, full_hi, hi = bounds
    lo = jnp.minimum(lo, hi)
    if segment_tiles is not None:
        lo = jnp.maximum(lo, segment_tiles[0])
        hi = jnp.maximum(jnp.minimum(hi, segment_tiles[3]), lo)
        full_lo = jnp.maximum(full_lo, segment_tiles[1])
        full_hi = jnp.minimum(full_hi, segment_tiles[2])
    elif geo.has_segments:
        full_lo = full_hi = hi
    full_lo = _clip(full_lo, lo, hi)
    return lo, full_lo, _clip(full_hi, full_lo, hi), hi


def kv_block_range(q_first, q_last, geo: Geometry, segment_tiles=None):
    """KV tiles ``[lo, hi)`` seen by queries ``q_first..q_last``; ``[full_lo, full_hi)`` of
    them need no mask (every query sees every key). Tiles outside are skipped entirely.
    ``segment_tiles``: this query tile's row of :func:`segment_tile_ranges` (else, with segment
    ids, every tile is masked)."""
    q_first = jnp.asarray(q_first, jnp.int32)
    q_last = jnp.asarray(q_last, jnp.int32)
    unpadded = geo.kv_len // geo.bk  # tiles with no padded keys
    if not geo.causal:
        lo, hi = jnp.int32(0), jnp.int32(geo.nk)
        full_lo, full_hi = jnp.int32(0), jnp.int32(unpadded)
    else:
        first_pos, last_pos = q_first + geo.offset, q_last + geo.offset
        hi = jnp.minimum(geo.nk, _div(last_pos, geo.bk) + 1)
        full_hi = jnp.minimum(unpadded, _div(first_pos + 1, geo.bk))
        if geo.window is None:
            lo, full_lo = jnp.int32(0), jnp.int32(0)
        else:
            lo = _div(jnp.maximum(0, first_pos - geo.window + 1), geo.bk)
            full_lo = _div(jnp.maximum(0, last_pos - geo.window + 1) + geo.bk - 1, geo.bk)
    return _with_segments((lo, full_lo, full_hi, hi), geo, segment_tiles)


def q_block_range(k_first, k_last, geo: Geometry, segment_tiles=None):
    """Query tiles ``[lo, hi)`` that see any of keys ``k_first..k_last``; ``[full_lo, full_hi)``
    of them see all of those keys (no mask needed). Used by the dK/dV pass; ``segment_tiles``
    as in :func:`kv_block_range`, for this KV tile."""
    k_first = jnp.asarray(k_first, jnp.int32)
    padded = k_last >= geo.kv_len  # the tile holds padded keys: every q tile needs the mask
    k_last = jnp.minimum(jnp.asarray(k_last, jnp.int32), geo.kv_len - 1)
    if not geo.causal:
        lo, hi = jnp.int32(0), jnp.int32(geo.nq)
        full_lo, full_hi = jnp.int32(0), jnp.int32(geo.nq)
    else:
        # query i (position i + offset) sees key j iff j <= i + offset < j + window
        lo = _div(jnp.maximum(0, k_first - geo.offset), geo.bq)
        full_lo = _div(jnp.maximum(0, k_last - geo.offset) + geo.bq - 1, geo.bq)
        if geo.window is None:
            hi, full_hi = jnp.int32(geo.nq), jnp.int32(geo.nq)
        else:
            top = k_last + geo.window - 1 - geo.offset  # last query index that sees a key
            hi = jnp.where(top < 0, 0, jnp.minimum(geo.nq, _div(jnp.maximum(top, 0), geo.bq) + 1))
            full_hi = _div(jnp.maximum(0, k_first + geo.window - geo.offset), geo.bq)
    lo, full_lo, full_hi, hi = _with_segments((lo, full_lo, full_hi, hi), geo, segment_tiles)
    full_hi = jnp.where(padded, full_lo, full_hi)
    return lo, full_lo, full_hi, hi


def tile_mask(q_idx, k_idx, q_seg, k_seg, geo: Geometry):
    """Visibility ``[rows, cols]`` for query indices ``q_idx [rows, 1]`` and key indices
    ``k_idx [1, cols]`` (segment ids shaped alike, or None)."""
    mask = k_idx < geo.kv_len
    if geo.causal:
        pos = q_idx + geo.offset
        mask = mask & (k_idx <= pos)
        if geo.window is not None:
            mask = mask & (k_idx > pos - geo.window)
    if q_seg is not None:
        mask = mask & (q_seg == k_seg)
    return mask


def _rows(x, shape):
    """Broadcast per-row values ``x [rows]`` to ``shape [rows, cols]``."""
    return lax.broadcast_in_dim(x, shape, (0,))


def softmax_tile(s2, m, row_sum, mask):
    """Softmax part of one KV tile of the streaming softmax (FlashAttention-2, alg. 1 lines
    8-10): from base-2 logits ``s2 [rows, cols]``, running max ``m [rows]`` and sum
    ``row_sum [rows]`` returns ``(m_new, row_sum_new, alpha, p)``; the caller rescales its
    output by ``alpha [rows]`` and adds ``p [rows, cols] @ V``. ``mask`` may be None.
    """
    if mask is not None:
        s2 = jnp.where(mask, s2, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s2, axis=1))
    # rows that have seen no key yet keep m = -inf; shift them by 0 instead
    m_new_safe = m_new if mask is None else jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_new_safe)
    p = jnp.exp2(s2 - _rows(m_new_safe, s2.shape))
    return m_new, row_sum * alpha + jnp.sum(p, axis=1), alpha, p


def online_softmax_step(s2, v, m, row_sum, acc, mask):
    """One KV tile of the streaming softmax (FlashAttention-2, alg. 1 lines 8-10).

    ``s2 [rows, cols]`` base-2 logits, ``v [cols, dim]``, running max ``m [rows]``, sum
    ``row_sum [rows]``, unnormalised output ``acc [rows, dim]`` (float32). ``mask`` may be None.
    """
    m_new, row_sum, alpha, p = softmax_tile(s2, m, row_sum, mask)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return m_new, row_sum, acc * _rows(alpha, acc.shape) + pv


def finalize(m, row_sum, acc, log2=jnp.log2):
    """Normalised output and base-2 log-sum-exp; rows that saw no key give 0 and lse=+inf.
    ``log2`` may be replaced where the backend has no such op."""
    empty = row_sum == 0.0
    denom = jnp.where(empty, 1.0, row_sum)
    out = acc / _rows(denom, acc.shape)
    lse2 = jnp.where(empty, jnp.inf, m + log2(denom))
    return out, lse2


def dot_nt(a, b):
    """``a [m, d] @ b[n, d]^T`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """``a [m, k] @ b [k, n]`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """``a [k, m]^T @ b [k, n]`` with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def backward_tile(q, k, v, do, lse2, delta, mask, geo: Geometry):
    """Recompute probabilities and their logit gradient for one tile (FA-2, alg. 2).

    Returns ``p [rows, cols]`` and ``ds [rows, cols]`` (gradient w.r.t. the unscaled logits
    ``q . k``, times ``1/scale``); ``lse2``/``delta`` are ``[rows, 1]`` float32.
    """
    s2 = dot_nt(q, k) * geo.scale2
    p = jnp.exp2(s2 - lse2)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = dot_nt(do, v)
    return p, p * (dp - delta)


def segment_block_bounds(seg: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per-tile min and max segment id ``[batch, n_tiles]`` (padded length, multiple of block)."""
    tiles = seg.reshape(seg.shape[0], -1, block)
    return jnp.min(tiles, axis=-1), jnp.max(tiles, axis=-1)


def segment_tile_ranges(
    row_seg: jax.Array, col_seg: jax.Array, row_block: int, col_block: int
) -> jax.Array:
    """For each tile of ``row_block`` rows, the column tiles ``[lo, hi)`` that may hold a column
    sharing a segment id with one of its rows, and those ``[full_lo, full_hi)`` whose every
    column shares the one segment of all its rows (no segment mask needed):
    ``int32 [batch, n_row_tiles * 4]`` (``lo, full_lo, full_hi, hi`` interleaved; ``lo == hi``
    when no column can be shared, ``full_lo == full_hi`` when no tile is whole).

    ``row_seg [batch, R]``, ``col_seg [batch, C]`` are padded to multiples of the blocks (with
    each row's last id, :func:`pad_ids`). A row tile and a column tile can share an id only if
    one of the row tile's ids lies within the column tile's ``[min, max]`` and one of the
    column tile's ids within the row tile's; ``[lo, hi)`` spans the column tiles passing both
    tests, so it holds every column sharing an id for any layout of ids (tiles outside hold no
    key or query the tile's rows may see: kernels skip them). For ids ascending along both
    sequences (packed documents, padding ids after them allowed) it is exactly the tiles from
    the first to the last one sharing an id; other layouts may add tiles that straddle
    documents (masked, not skipped). A row tile of one id ``s`` has as whole
    tiles the column tiles of the one id ``s``; they form one run for packed documents; where
    they do not (ids repeated apart), the run is left empty and every tile is masked. Fused
    reductions over row tiles x column tiles x a tile's ids, no sort.
    """
    b = row_seg.shape[0]
    rows = row_seg.reshape(b, -1, 1, row_block)  # [batch, row tiles, 1, row_block]
    cols = col_seg.reshape(b, 1, -1, col_block)  # [batch, 1, col tiles, col_block]
    row_lo, row_hi = rows.min(-1), rows.max(-1)  # [batch, row tiles, 1]
    col_lo, col_hi = cols.min(-1), cols.max(-1)  # [batch, 1, col tiles]
    within = lambda ids, lo, hi: jnp.any((ids >= lo[..., None]) & (ids <= hi[..., None]), -1)  # noqa: E731
    meets = within(rows, col_lo, col_hi) & within(cols, row_lo, row_hi)
    whole = (row_lo == row_hi) & (col_lo == col_hi) & (col_lo == row_lo)
    n = cols.shape[2]
    index = lax.broadcasted_iota(jnp.int32, meets.shape, 2)
    first = lambda m: jnp.min(jnp.where(m, index, n), axis=-1)  # noqa: E731
    stop = lambda m: jnp.max(jnp.where(m, index + 1, 0), axis=-1)  # noqa: E731
    hi = stop(meets)
    lo = jnp.minimum(first(meets), hi)
    full_lo, full_hi = first(whole), stop(whole)
    run = (full_hi > full_lo) & (jnp.sum(whole, axis=-1, dtype=jnp.int32) == full_hi - full_lo)
    full_lo, full_hi = jnp.where(run, full_lo, lo), jnp.where(run, full_hi, lo)
    return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).reshape(b, -1).astype(jnp.int32)


def pad_ids(ids: jax.Array, size: int) -> jax.Array:
    """Segment ids ``[batch, n]`` -> int32 ``[batch, size]``, padded with each row's last id:
    padding then widens no tile's id interval (``segment_tile_ranges``); padded keys are
    masked by position, padded queries' rows dropped."""
    ids = ids.astype(jnp.int32)
    if ids.shape[1] == size:
        return ids
    return jnp.pad(ids, ((0, 0), (0, size - ids.shape[1])), mode="edge")


def pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """``x`` padded with ``value`` at the end of ``axis`` to length ``size``."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def work_item(p: jax.Array, tiles: int, batch: int, heads: int, group: int, last_first: bool):
    """Program ``p`` of a 1-D GPU grid of ``tiles * batch * heads`` -> (tile, batch index, head).

    The (batch, head) pairs go in groups of ``group`` (``tuning.heads_per_wave``); a group's CTAs
    run rank by rank, its pairs fastest, rank 0 being the heaviest causal tile: the last one for
    query tiles (``last_first``), the first for KV tiles. The GPU dispatches CTAs in program
    order as SMs free up, so every head's heavy tiles start early and the last wave holds light
    ones (longest-processing-time-first list scheduling), while only ``group`` heads' K/V (or Q,
    dO) stream at a time, which L2 holds."""
    per_group = jnp.int32(group * tiles)
    g, r = lax.div(p, per_group), lax.rem(p, per_group)
    rank, bh = lax.div(r, jnp.int32(group)), g * group + lax.rem(r, jnp.int32(group))
    tile = tiles - 1 - rank if last_first else rank
    return tile, lax.div(bh, jnp.int32(heads)), lax.rem(bh, jnp.int32(heads))
