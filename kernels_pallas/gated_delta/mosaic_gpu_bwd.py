"""Hopper backward of the gated delta rule: the reverse state pass in Pallas Mosaic GPU.

Triton's :func:`.triton_bwd.w_and_scores` gives every chunk's ``W = T kg``, the scores ``Q K^T
* decay_incl`` and, for this pass, the scaled rows ``K e_end`` and ``-(Q g_read)`` (parallel over
chunks). One CTA per (batch, head, ``BLOCK_V``-column value tile) then walks the chunks in
reverse with ``dS = dL/dS`` ``[dk, BLOCK_V]`` in float32 registers, as
:func:`._chunk.u_grad` and :func:`._chunk.state_grad`: per chunk

* ``dS`` is published in bf16 (the chunk's ``dh``, which the gradient kernel reads, and the
  next product's operand);
* ``dU = (K e_end) dS + scores^T dO``: one accumulator of two ``wgmma`` s, published in bf16
  (the chunk's ``dU``);
* ``dS <- carry dS + (Q g_read)^T dO - W^T dU``, accumulated as its negative ``-carry dS +
  W^T dU + (-(Q g_read))^T dO`` (every operand as stored, no extra sign pass).

Two warpgroups: a producer streams ``K e_end``, ``-(Q g_read)``, ``W``, ``dO``, the scores
and the carries through a ring of ``stages`` slots with TMA, the state warpgroup runs the chain
and copies ``dh`` and ``dU`` out of their two-slot buffers. The operands are those of the
Triton pass rounded the same way (bf16 ``wgmma`` operands, float32 accumulation); only the
summation order inside the products differs. The rest of the backward is Triton's.

Interpret mode runs the same kernel with ``jnp`` products (:func:`kernels_pallas._hopper.mma`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import repeat
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas._hopper import (
    ROWS,
    SMEM_BYTES,
    WGMMA_TRANSFORMS,
    Transposed,
    columns,
    interpret_params,
    mma,
    produce,
    smem_footprint,
    vector,
    wgmma_operands,
    zero_acc,
)
from kernels_pallas.gated_delta import triton_bwd
from kernels_pallas.gated_delta._chunk import F32, Cfg
from kernels_pallas.linear_attention_scan.mosaic_gpu_fwd import (
    BLOCK_V,
    CHUNK,
    F32_TRANSFORMS,
    load_state,
    store_state,
    value_tile_program,
)

DTYPE = jnp.bfloat16  # the operands' dtype: Cfg.store of the inputs this pass takes


def scratch_types(dk: int, stages: int) -> tuple:
    """Rings of ``K e_end``, ``-(Q g_read)``, ``W`` (``[C, dk]``), ``dO`` (``[C, BLOCK_V]``),
    the scores (``[C, C]``) and the carries (one per state row); two slots of the published
    ``dS`` and ``dU``; the float32 staging of ``dL/dS_final`` in and ``dS_0`` out; barriers."""
    mat = lambda *shape: plgpu.SMEM(shape, DTYPE, transforms=WGMMA_TRANSFORMS)  # noqa: E731
    return (
        (
            mat(stages, CHUNK, dk),  # K e_end
            mat(stages, CHUNK, dk),  # -(Q g_read)
            mat(stages, CHUNK, dk),  # W
            mat(stages, CHUNK, BLOCK_V),  # dO
            mat(stages, CHUNK, CHUNK),  # scores
            plgpu.SMEM((stages, dk // ROWS, ROWS), F32),  # carry, one per state row
            mat(2, dk, BLOCK_V),  # dS leaving chunk n (its dh), in slot (step) % 2
            mat(2, CHUNK, BLOCK_V),  # dU of chunk n, in slot (step) % 2
            plgpu.SMEM((dk, BLOCK_V), F32, transforms=F32_TRANSFORMS),  # dS_final in, dS_0 out
        ),
        tuple(plgpu.Barrier(num_barriers=stages) for _ in range(6)),  # slot loaded, per ring
        plgpu.Barrier(),  # dS_final staged
        plgpu.Barrier(num_barriers=stages),  # slot consumed
    )


def _kernel(ke_ref, qs_ref, w_ref, do_ref, sc_ref, f_ref, dsf_ref, dh_ref, du_ref, ds0_ref,
            smem, ready, dsf_ready, free, *, stages: int, interpret: bool):  # fmt: skip
    """One CTA per (batch, head, value tile), program id ``p = (batch * heads + head) * tiles
    + tile``; warpgroup 1 produces, 0 carries ``dS`` (module doc). Step ``t`` is chunk
    ``n_chunks - 1 - t``."""
    ke_ring, qs_ring, w_ring, do_ring, sc_ring, f_ring, s_pub, u_pub, sf_smem = smem
    _, heads, length, dk = ke_ref.shape
    tiles = do_ref.shape[-1] // BLOCK_V
    n_chunks = length // CHUNK
    halves = dk // ROWS
    batch, head, cols = value_tile_program(heads, tiles)
    rows = lambda n: pl.ds(pl.multiple_of(n * CHUNK, CHUNK), CHUNK)  # noqa: E731
    chunk_of = lambda t: n_chunks - 1 - t  # noqa: E731
    ring_slot = lambda t: lax.rem(t, jnp.int32(stages))  # noqa: E731
    two = lambda t: lax.rem(t, jnp.int32(2))  # noqa: E731
    shape_sv = (ROWS, BLOCK_V)
    wg = lax.axis_index("wg")

    @pl.when(wg == 1)
    def _producer():
        def load(t, slot):
            n = chunk_of(t)
            t_rows = rows(n)
            ke_ready, qs_ready, w_ready, do_ready, sc_ready, f_ready = ready
            for ref, ring, bar in ((ke_ref, ke_ring, ke_ready), (qs_ref, qs_ring, qs_ready),
                                   (w_ref, w_ring, w_ready)):  # fmt: skip
                plgpu.copy_gmem_to_smem(ref.at[batch, head, t_rows], ring.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[batch, t_rows, head, cols], do_ring.at[slot],
                                    do_ready.at[slot])  # fmt: skip
            for ref, ring, bar in ((sc_ref, sc_ring, sc_ready), (f_ref, f_ring, f_ready)):
                plgpu.copy_gmem_to_smem(ref.at[batch, head, n], ring.at[slot], bar.at[slot])

        produce(load, n_chunks, stages, free)

    @pl.when(wg == 0)
    def _state():
        def step(t, ds):
            n, slot, pub = chunk_of(t), ring_slot(t), two(t)
            # the copies out of slot pub, two steps ago (each step copies dh, then dU)
            plgpu.wait_smem_to_gmem(2, wait_read_only=True)
            for i, part in enumerate(ds):
                s_pub.at[pub, pl.ds(i * ROWS, ROWS)][...] = part.astype(DTYPE)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(s_pub.at[pub], dh_ref.at[batch, head, n, :, cols])
            for bar in ready:
                plgpu.barrier_wait(bar.at[slot])
            ke, qs, w, do, sc = wgmma_operands(
                (ke_ring.at[slot], qs_ring.at[slot], w_ring.at[slot], do_ring.at[slot],
                 sc_ring.at[slot]),
                interpret,
            )  # fmt: skip
            carry = [vector(f_ring.at[slot, i], 0, interpret) for i in range(halves)]
            products = [(ke, s_pub.at[pub]), (Transposed(sc), do)]
            (du,) = mma(((zero_acc((CHUNK, BLOCK_V), interpret), products),), interpret)
            u_pub.at[pub][...] = du.astype(DTYPE)
            plgpu.commit_smem()  # for wgmma and TMA; also fences the slot's carry loads
            plgpu.copy_smem_to_gmem(u_pub.at[pub], du_ref.at[batch, head, rows(n), cols])
            neg = [part * lax.broadcast_in_dim(-carry[i], shape_sv, (0,))
                   for i, part in enumerate(ds)]  # fmt: skip
            neg = mma(tuple((acc, [(Transposed(columns(w, i, interpret)), u_pub.at[pub]),
                                   (Transposed(columns(qs, i, interpret)), do)])
                            for i, acc in enumerate(neg)),
                      interpret)  # fmt: skip
            plgpu.barrier_arrive(free.at[slot])
            return tuple(-acc for acc in neg)

        ds = load_state(dsf_ref.at[batch, head, :, cols], sf_smem, dsf_ready, interpret)
        ds = lax.fori_loop(0, n_chunks, step, ds)
        store_state(ds, sf_smem, ds0_ref.at[batch, head, :, cols])


def carries(inputs: dict, cfg: Cfg) -> jax.Array:
    """Each chunk's state decay ``exp(gam_last)`` (0 where a document starts in the chunk),
    once per state row: ``[batch, heads, chunks, dk / 64, 64]`` float32."""
    carry = jnp.exp(inputs["gam_r"][..., 0, -1])  # [batch, heads, chunks]
    if cfg.segments:  # the chunk's last row reads the incoming state only in one document
        carry = carry * inputs["reads"][:, cfg.chunk - 1 :: cfg.chunk, 0][:, None, :]
    dk = inputs["k"].shape[-1]
    return repeat(carry, "b h n -> b h n i c", i=dk // ROWS, c=ROWS)


def state_grads(inputs: dict, w, sc, ke, qs, do, ds_final, cfg: Cfg, *, stages: int = 2):
    """``(dh [batch, heads, chunks, dk, dv], dU [batch, heads, len, dv], ds0)`` as
    :func:`.triton_bwd.state_grads` (bf16, bf16, float32) from ``W``, the scores and the scaled
    rows ``ke = K e_end``, ``qs = -(Q g_read)`` of :func:`.triton_bwd.w_and_scores`."""
    bsz, length, heads, dk = inputs["q"].shape
    dv = inputs["v"].shape[-1]
    scratch = scratch_types(dk, stages)
    if (need := smem_footprint(scratch)) > SMEM_BYTES:
        raise ValueError(f"gated delta mosaic backward: stages={stages} needs {need} B of "
                         f"shared memory > {SMEM_BYTES}")  # fmt: skip
    out_type = (
        jax.ShapeDtypeStruct((bsz, heads, length // CHUNK, dk, dv), DTYPE),
        jax.ShapeDtypeStruct((bsz, heads, length, dv), DTYPE),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
    )
    return plgpu.kernel(
        functools.partial(_kernel, stages=stages, interpret=cfg.interpret),
        out_type=out_type,
        scratch_types=scratch,
        grid=(bsz * heads * (dv // BLOCK_V),),
        grid_names=("p",),
        num_threads=2,
        thread_name="wg",
        interpret=interpret_params() if cfg.interpret else None,
    )(ke, qs, w, do.astype(DTYPE), sc, carries(inputs, cfg), ds_final)


def backward(inputs: dict, res: tuple, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """:func:`.triton_bwd.backward` with this reverse state pass."""
    w, sc, ke, qs = triton_bwd.w_and_scores(inputs, res[1], cfg, state_operands=True)
    dh, du, ds0 = state_grads(inputs, w, sc, ke, qs, do, ds_final, cfg)
    return triton_bwd.gradients(inputs, res, do, dh, du, ds0, cfg)


__all__ = ["backward", "carries", "state_grads"]
