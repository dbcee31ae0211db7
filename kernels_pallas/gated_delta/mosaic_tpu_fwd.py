"""TPU forward (Pallas Mosaic TPU): grid (batch, heads, value tiles, chunks); the chunk axis
is ``arbitrary`` (in order; reversed by the backward, ``mosaic_tpu_bwd.py``) and carries the
``[dk, bv]`` state tile in VMEM scratch.

Head-major layouts: ``q, k [batch, heads, len, dk]``, ``v, o [batch, heads, len, dv]``;
``beta``/``gam`` as columns ``[batch, heads, len, 1]``, ``gam`` also as rows ``[batch, heads,
chunks, 1, C]``; document masks ``[batch, len, 1]`` / ``[batch, chunks, 1, C]``.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.gated_delta._chunk import F32, Cfg, Chunk, chunk_forward


def specs(names: list[str], cfg: Cfg, dk: int, n_chunks: int, *, reverse: bool) -> dict:
    """Block specs by array name over the grid (b, h, j, n)."""
    c, bv = cfg.chunk, cfg.block_v

    def at(n):
        return n_chunks - 1 - n if reverse else n

    table = {
        "q": pl.BlockSpec((None, None, c, dk), lambda b, h, j, n: (b, h, at(n), 0)),
        "v": pl.BlockSpec((None, None, c, bv), lambda b, h, j, n: (b, h, at(n), j)),
        "col": pl.BlockSpec((None, None, c, 1), lambda b, h, j, n: (b, h, at(n), 0)),
        "row": pl.BlockSpec((None, None, None, 1, c), lambda b, h, j, n: (b, h, at(n), 0, 0)),
        "doc_col": pl.BlockSpec((None, c, 1), lambda b, h, j, n: (b, at(n), 0)),
        "doc_row": pl.BlockSpec((None, None, 1, c), lambda b, h, j, n: (b, at(n), 0, 0)),
        "state": pl.BlockSpec((None, None, dk, bv), lambda b, h, j, n: (b, h, 0, j)),
        "h": pl.BlockSpec((None, None, None, dk, bv), lambda b, h, j, n: (b, h, at(n), 0, j)),
        "part_k": pl.BlockSpec((None, None, None, c, dk), lambda b, h, j, n: (j, b, h, at(n), 0)),
        "part_col": pl.BlockSpec((None, None, None, c, 1), lambda b, h, j, n: (j, b, h, at(n), 0)),
        "part_row": pl.BlockSpec(
            (None, None, None, None, 1, c), lambda b, h, j, n: (j, b, h, at(n), 0, 0)
        ),
    }
    kinds = dict(q="q", k="q", v="v", beta_c="col", gam_c="col", gam_r="row",
                 doc_c="doc_col", reads="doc_col", last="doc_col", doc_r="doc_row")  # fmt: skip
    return {"inputs": [table[kinds[n]] for n in names], **table}


def load(ins: dict, cfg: Cfg) -> Chunk:
    same = reads = last = None
    if cfg.segments:
        same = ins["doc_c"][...] == ins["doc_r"][...]
        reads, last = ins["reads"][...], ins["last"][...]
    return Chunk(
        ins["q"][...].astype(F32), ins["k"][...].astype(F32), ins["v"][...].astype(F32),
        ins["beta_c"][...], ins["gam_c"][...], ins["gam_r"][...],
        same, reads, last,
    )  # fmt: skip


def compiler_params(cfg: Cfg):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def forward(inputs: dict, s0: jax.Array, cfg: Cfg, *, save_states: bool):
    """``(o, s_final, h)`` as :func:`kernels_pallas.gated_delta.triton_fwd.forward`."""
    names = list(inputs)
    bsz, heads, length, dk = inputs["q"].shape
    dv = inputs["v"].shape[3]
    n_chunks = length // cfg.chunk
    sp = specs(names, cfg, dk, n_chunks, reverse=False)

    def kernel(*refs):
        ins = dict(zip(names, refs))
        s0_ref, o_ref, sf_ref, *rest = refs[len(names) :]
        scratch, n = rest[-1], pl.program_id(3)

        @pl.when(n == 0)
        def _():
            scratch[...] = s0_ref[...]

        s = scratch[...]
        if save_states:
            rest[0][...] = s
        out, s = chunk_forward(load(ins, cfg), s, cfg.precision)
        o_ref[...] = out.astype(o_ref.dtype)
        scratch[...] = s

        @pl.when(n == n_chunks - 1)
        def _():
            sf_ref[...] = s

    out_shape = [
        jax.ShapeDtypeStruct((bsz, heads, length, dv), inputs["q"].dtype),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
    ]
    out_specs = [sp["v"], sp["state"]]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((bsz, heads, n_chunks, dk, dv), F32))
        out_specs.append(sp["h"])
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bsz, heads, dv // cfg.block_v, n_chunks),
        in_specs=sp["inputs"] + [sp["state"]], out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, cfg.block_v), F32)], interpret=cfg.interpret,
        compiler_params=compiler_params(cfg), name="gated_delta_fwd",
    )(*inputs.values(), s0)  # fmt: skip
    return outs[0], outs[1], (outs[2] if save_states else None)
