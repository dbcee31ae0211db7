"""Hopper backward of the gated delta rule in Pallas Mosaic GPU: the reverse state pass, then
the gradient kernel, parallel over chunks.

The state pass: one CTA per (batch, head, ``BLOCK_V``-column value tile) walks the chunks in
reverse with ``dS = dL/dS`` ``[dk, BLOCK_V]`` in float32 registers, as :func:`._chunk.u_grad`
and :func:`._chunk.state_grad`: per chunk

* ``dS`` is published in bf16 (the chunk's ``dh``, which the gradient kernel reads, and the
  next product's operand);
* ``dU = (K e_end) dS + scores^T dO``: one accumulator of two ``wgmma`` s, published in bf16
  (the chunk's ``dU``);
* ``dS <- carry dS + (Q g_read)^T dO - W^T dU``, accumulated as its negative ``-carry dS +
  W^T dU + (-(Q g_read))^T dO`` (every operand as stored, no extra sign pass).

Two warpgroups: a producer streams ``K``, ``Q``, the forward's saved ``W``, ``dO``, the
carries and the chunk's factors through a ring of ``stages`` slots with TMA and forms ``K
e_end``, ``-(Q g_read)`` and the scores ``Q K^T * decay_incl`` in the slots of ``K``, ``Q`` and
the scores (one ``wgmma``, ahead of the state warpgroup); the state warpgroup runs the chain and
copies ``dh`` and ``dU`` out of their two-slot buffers. Forming them there instead of in a
kernel of their own (a W / scores kernel, parallel over chunks) saved that kernel, its writes
and this pass's reads, measured faster on an H100
(``experiments/results/bench_gated_delta_formed.md``). The operands are those of the Triton
pass rounded the same way (bf16 ``wgmma`` operands, float32 accumulation); only the summation
order inside the products differs.

The gradient kernel (:func:`gradients`): one CTA per chunk loads every operand of the chunk
(``Q, K, V, U, dO, dU, T``, the state entering it and ``dL/dS`` leaving it) with TMA and runs
:func:`._chunk.tile_backward` on the whole ``dv``, :func:`._chunk.scores_backward` and
:func:`._chunk.finish_backward` as 16 ``wgmma`` products on two warpgroups, each with a chain of
its own: the scores' (``dQ``, ``dscores``, ``dV``) and the one through ``W`` and the UT transform
(``dK``), 5 groups on the longer chain (each waited for before the next) against 12 on one
warpgroup, which was measured slower on an H200 (``experiments/results/bench_gated_delta_wg2.md``).
The ``[C, C]`` intermediates that a product reads transposed or as its right operand
(``dscores``, ``dL/dT``, ``dL/d(K K^T)``) are published in bf16; ``dQ`` and ``dV`` are staged in a
buffer of their own and in ``dO``'s, ``dK`` in ``K``'s. The state carry's part of ``dL/dgam_last``
leaves the kernel as per-row parts (``S . dS``, and ``K . dK_end``) that XLA sums, with the two
warpgroups' parts of ``dbeta`` and ``dgam``.

Both serve where :func:`.mosaic_gpu_fwd.mosaic_backward` holds (bf16, ``dk`` and ``dv`` in
:data:`.mosaic_gpu_fwd.GRAD_DIMS`); elsewhere the backward is Triton's
(:func:`.triton_bwd.backward`). Interpret mode runs the same kernels with ``jnp`` products
(:func:`kernels_pallas._hopper.mma`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
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
    load_acc,
    mma,
    produce,
    smem_footprint,
    vector,
    wgmma_operands,
    zero_acc,
)
from kernels_pallas.gated_delta import mosaic_gpu_fwd, triton_bwd
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
    """Rings of ``K`` (then ``K e_end``), ``Q`` (then ``-(Q g_read)``), ``W`` (``[C, dk]``),
    ``dO`` (``[C, BLOCK_V]``), the scores (``[C, C]``), the carries (one per state row) and the
    chunk's factors (:func:`.mosaic_gpu_fwd.factors`); two slots of the published ``dS`` and
    ``dU``; the float32 staging of ``dL/dS_final`` in and ``dS_0`` out; a load barrier per ring
    fed by TMA, one per slot formed, one per slot consumed."""
    mat = lambda *shape: plgpu.SMEM(shape, DTYPE, transforms=WGMMA_TRANSFORMS)  # noqa: E731
    return (
        (
            mat(stages, CHUNK, dk),  # K, then K e_end
            mat(stages, CHUNK, dk),  # Q, then -(Q g_read)
            mat(stages, CHUNK, dk),  # W
            mat(stages, CHUNK, BLOCK_V),  # dO
            mat(stages, CHUNK, CHUNK),  # scores
            plgpu.SMEM((stages, dk // ROWS, ROWS), F32),  # carry, one per state row
            mat(2, dk, BLOCK_V),  # dS leaving chunk n (its dh), in slot (step) % 2
            mat(2, CHUNK, BLOCK_V),  # dU of chunk n, in slot (step) % 2
            plgpu.SMEM((dk, BLOCK_V), F32, transforms=F32_TRANSFORMS),  # dS_final in, dS_0 out
            plgpu.SMEM((stages, 6, CHUNK), F32),  # factors along rows
            plgpu.SMEM((stages, 4, CHUNK), F32),  # along columns
        ),
        tuple(plgpu.Barrier(num_barriers=stages) for _ in range(7)),  # slot loaded, per ring
        plgpu.Barrier(),  # dS_final staged
        plgpu.Barrier(num_barriers=stages),  # slot consumed
        plgpu.Barrier(num_barriers=stages),  # slot formed
    )


def _kernel(k_ref, q_ref, w_ref, do_ref, f_ref, fr_ref, fc_ref, dsf_ref, dh_ref, du_ref, ds0_ref,
            smem, ready, dsf_ready, free, formed, *, stages: int, interpret: bool):  # fmt: skip
    """One CTA per (batch, head, value tile), program id ``p = (batch * heads + head) * tiles
    + tile``; warpgroup 1 loads and forms, 0 carries ``dS`` (module doc). Step ``t`` is chunk
    ``n_chunks - 1 - t``."""
    ke_ring, qs_ring, w_ring, do_ring, sc_ring, f_ring, s_pub, u_pub, sf_smem = smem[:9]
    fr_ring, fc_ring = smem[9:]
    # one per ring fed by TMA, in the order of the producer's copies
    k_ready, q_ready, w_ready, do_ready, f_ready, fr_ready, fc_ready = ready
    _, length, heads, dk = k_ref.shape
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

    def form(slot) -> None:
        """The slot's ``K e_end``, ``-(Q g_read)`` and scores ``Q K^T * decay_incl`` from its
        raw ``K``, ``Q`` and factors, in place (bf16), then the slot is marked formed."""
        for bar in (k_ready, q_ready, fr_ready, fc_ready):
            plgpu.barrier_wait(bar.at[slot])
        g = mosaic_gpu_fwd.Gates(fr_ring.at[slot], fc_ring.at[slot], interpret)
        k, q = wgmma_operands((ke_ring.at[slot], qs_ring.at[slot]), interpret)
        (sc,) = mma(((zero_acc((CHUNK, CHUNK), interpret), [(q, Transposed(k))]),), interpret)
        ke = load_acc(ke_ring.at[slot], interpret) * g.t("e_end", dk)
        qs = -(load_acc(qs_ring.at[slot], interpret) * g.t("g_read", dk))
        for ring, x in ((sc_ring, sc * g.decay(strict=False)), (ke_ring, ke), (qs_ring, qs)):
            ring.at[slot][...] = x.astype(DTYPE)
        plgpu.commit_smem()  # for the state warpgroup's wgmma, and TMA's next use of the slot
        plgpu.barrier_arrive(formed.at[slot])

    @pl.when(wg == 1)
    def _producer():
        def load(t, slot):
            n = chunk_of(t)
            t_rows = rows(n)
            copies = ((k_ref.at[batch, t_rows, head], ke_ring),
                      (q_ref.at[batch, t_rows, head], qs_ring),
                      (w_ref.at[batch, head, t_rows], w_ring),
                      (do_ref.at[batch, t_rows, head, cols], do_ring),
                      (f_ref.at[batch, head, n], f_ring),
                      (fr_ref.at[batch, head, n], fr_ring),
                      (fc_ref.at[batch, head, n], fc_ring))  # fmt: skip
            for (src, ring), bar in zip(copies, ready, strict=True):
                plgpu.copy_gmem_to_smem(src, ring.at[slot], bar.at[slot])
            form(slot)

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
            for bar in (w_ready, do_ready, f_ready, formed):
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


def chunk_carry(inputs: dict, cfg: Cfg) -> jax.Array:
    """Each chunk's state decay ``exp(gam_last)`` (0 where a document starts in the chunk):
    ``[batch, heads, chunks]`` float32."""
    carry = jnp.exp(inputs["gam_r"][..., 0, -1])
    if cfg.segments:  # the chunk's last row reads the incoming state only in one document
        carry = carry * inputs["reads"][:, cfg.chunk - 1 :: cfg.chunk, 0][:, None, :]
    return carry


def carries(inputs: dict, cfg: Cfg) -> jax.Array:
    """:func:`chunk_carry` once per state row: ``[batch, heads, chunks, dk / 64, 64]``."""
    dk = inputs["k"].shape[-1]
    return repeat(chunk_carry(inputs, cfg), "b h n -> b h n i c", i=dk // ROWS, c=ROWS)


def state_grads(inputs: dict, w, do, ds_final, cfg: Cfg, *, stages: int = 2):
    """``(dh [batch, heads, chunks, dk, dv], dU [batch, heads, len, dv], ds0)`` as
    :func:`.triton_bwd.state_grads` (bf16, bf16, float32) from bf16 ``Q``, ``K`` and the
    forward's ``W`` (module doc)."""
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
        kernel_name="gated_delta_state_bwd",
        interpret=interpret_params() if cfg.interpret else None,
    )(inputs["k"], inputs["q"], w, do.astype(DTYPE), carries(inputs, cfg),
      *mosaic_gpu_fwd.factors(inputs, cfg), ds_final)  # fmt: skip


def backward(inputs: dict, res: tuple, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """:func:`.triton_bwd.backward` for the residuals of :func:`.mosaic_gpu_fwd.forward`:
    where :func:`.mosaic_gpu_fwd.mosaic_backward` holds, this module's state pass (with the
    saved ``W``, ``res[3]``) and :func:`gradients`, else Triton's kernels."""
    if not mosaic_gpu_fwd.mosaic_backward(inputs["q"], inputs["v"]):
        return triton_bwd.backward(inputs, res, do, ds_final, cfg)
    dh, du, ds0 = state_grads(inputs, res[3], do, ds_final, cfg)
    return gradients(inputs, res[:3], do, dh, du, ds0, cfg)


# per chunk, float32: rows of per-row results (dbeta and dgam along rows of warpgroup 1, de, the
# same two of warpgroup 0, then S . dS in dk / 64 parts) and of per-column ones (dgam along
# columns, one per warpgroup)
ROW_PARTS, COL_PARTS = 5, 2


def grad_scratch(dk: int, dv: int) -> tuple:
    """The gradient kernel's buffers: each operand of one chunk (``Q``, ``K`` then ``dK``,
    ``V``, ``U``, ``dO`` then ``dV``, ``dU``, ``T``, ``S``, ``dL/dS``), the published ``dL/dW``,
    one ``[C, C]`` buffer that publishes ``dL/dT``, then ``dL/d(K K^T)``, one that publishes
    ``dscores``, ``dQ``'s staging; the factors and the per-row and per-column results; one
    barrier per load, and two that warpgroup 0 arrives at for warpgroup 1."""
    mat = lambda *shape: plgpu.SMEM(shape, DTYPE, transforms=WGMMA_TRANSFORMS)  # noqa: E731
    return (
        (
            *(mat(CHUNK, dk) for _ in range(2)),  # Q, K
            *(mat(CHUNK, dv) for _ in range(4)),  # V, U, dO, dU
            mat(CHUNK, CHUNK),  # T
            *(mat(dk, dv) for _ in range(2)),  # S entering the chunk, dL/dS leaving it
            mat(CHUNK, dk),  # dL/dW
            mat(CHUNK, CHUNK),  # dL/dT, dL/d(K K^T)
            mat(CHUNK, CHUNK),  # dscores
            mat(CHUNK, dk),  # dQ
            plgpu.SMEM((6, CHUNK), F32),  # factors along rows (mosaic_gpu_fwd.factors)
            plgpu.SMEM((4, CHUNK), F32),  # along columns
            plgpu.SMEM((ROW_PARTS + dk // ROWS, CHUNK), F32),
            plgpu.SMEM((COL_PARTS, CHUNK), F32),
        ),
        plgpu.Barrier(num_barriers=11),
        plgpu.Barrier(num_barriers=2),  # handoff, warpgroup 0 -> 1
    )


def publish(ref, x) -> None:
    """Store ``x`` in ``ref`` as a ``wgmma`` operand (or a TMA source): cast and fenced."""
    ref[...] = x.astype(ref.dtype)
    plgpu.commit_smem()


def copy_out(ref, x, dst) -> None:
    """:func:`publish` ``x`` in ``ref`` and copy it to ``dst`` with TMA."""
    publish(ref, x)
    plgpu.copy_smem_to_gmem(ref, dst)


def _grad_kernel(q_ref, k_ref, v_ref, u_ref, do_ref, du_ref, t_ref, h_ref, dh_ref, fr_ref, fc_ref,
                 dq_ref, dk_ref, dv_ref, ro_ref, co_ref, smem, ready, handoff, *,
                 interpret: bool):  # fmt: skip
    """One CTA of two warpgroups per chunk, program id ``p = (batch * heads + head) * chunks +
    chunk``: :func:`._chunk.tile_backward` on the whole ``dv``, :func:`._chunk.scores_backward`
    and :func:`._chunk.finish_backward` in one pass, each product chain on its own warpgroup so
    that one's ``wgmma`` latency overlaps the other's work (:func:`gradients`). Warpgroup 0 (the
    scores): issues the loads; ``Q K^T``, ``dO U^T``, ``dO S^T``, then ``dQ`` and ``dscores``
    (published), ``S . dS``, ``dV = beta T^T dU``. Warpgroup 1 (through ``U``'s end state, ``W``
    and the UT transform): ``dW``, ``dL/dT``, ``dL/d(K K^T)`` and the whole ``dK``, whose last
    product also reads warpgroup 0's ``dscores``. ``handoff[0]``: ``dscores`` published and
    warpgroup 0 done with ``K`` (which stages ``dK``); ``handoff[1]``: its per-row results
    written."""
    q_s, k_s, v_s, u_s, do_s, du_s, t_s, h_s, dh_s, dw_s, cc_s, ds_s, dq_s = smem[:13]
    fr_s, fc_s, ro_s, co_s = smem[13:]
    _, length, heads, dk = q_ref.shape
    dv = v_ref.shape[-1]
    batch, head, n, rows = mosaic_gpu_fwd.chunk_program(heads, length)
    wg = lax.axis_index("wg")
    wait = mosaic_gpu_fwd.load_chunk(
        {
            "q": (q_ref.at[batch, rows, head], q_s),
            "k": (k_ref.at[batch, rows, head], k_s),
            "u": (u_ref.at[batch, head, rows], u_s),
            "do": (do_ref.at[batch, rows, head], do_s),
            "h": (h_ref.at[batch, head, n], h_s),
            "dh": (dh_ref.at[batch, head, n], dh_s),
            "du": (du_ref.at[batch, head, rows], du_s),
            "t": (t_ref.at[batch, head, n], t_s),
            "v": (v_ref.at[batch, rows, head], v_s),
        },
        (fr_ref, fc_ref, fr_s, fc_s),
        ready,
        issuer=wg == 0,
    )
    cc, ck, cv = (CHUNK, CHUNK), (CHUNK, dk), (CHUNK, dv)
    zero = lambda shape: zero_acc(shape, interpret)  # noqa: E731
    tile = functools.partial(load_acc, interpret=interpret)  # registers, float32
    row_sum, col_sum = (lambda x: jnp.sum(x, axis=1)), (lambda x: jnp.sum(x, axis=0))  # noqa: E731

    @pl.when(wg == 0)
    def _scores():
        wait("rows", "cols", "q", "k", "u", "do", "h")
        g = mosaic_gpu_fwd.Gates(fr_s, fc_s, interpret)
        q, k, u, do, h = wgmma_operands((q_s, k_s, u_s, do_s, h_s), interpret)
        # sc = Q K^T * decay_incl: dsc = dO U^T; dq = dscores K + g_read dO S^T
        sc, dsc, dq = mma(((zero(cc), [(q, Transposed(k))]), (zero(cc), [(do, Transposed(u))]),
                           (zero(ck), [(do, Transposed(h))])), interpret)  # fmt: skip
        decay_incl = g.decay(strict=False)
        pairs = dsc * sc * decay_incl
        dscores = dsc * decay_incl
        publish(ds_s, dscores)
        dq = dq * g.t("g_read", dk)
        dgam_c = row_sum(pairs) + row_sum(tile(q_s) * dq)
        (dq,) = mma(((dq, [(dscores.astype(DTYPE), k)]),), interpret)
        plgpu.barrier_arrive(handoff.at[0])  # K's and dscores' reads here are done
        copy_out(dq_s, dq, dq_ref.at[batch, rows, head])
        wait("dh")  # the state carry's part of dL/dgam_last, S . dS_next in row parts
        halves = [pl.ds(i * ROWS, ROWS) for i in range(dk // ROWS)]
        dcarry = [row_sum(tile(h_s.at[i]) * tile(dh_s.at[i])) for i in halves]
        wait("du", "v", "t")
        t, du = wgmma_operands((t_s, du_s), interpret)
        (dvb,) = mma(((zero(cv), [(Transposed(t), du)]),), interpret)  # dV = beta T^T dU
        copy_out(do_s, dvb * g.t("beta", dv), dv_ref.at[batch, rows, head])  # dO is read
        for i, x in enumerate((row_sum(dvb * tile(v_s)), dgam_c, *dcarry)):
            ro_s.at[3 + i][...] = x
        co_s.at[1][...] = -col_sum(pairs)
        plgpu.commit_smem()
        plgpu.barrier_arrive(handoff.at[1])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _transform():
        wait("rows", "cols", "q", "k", "u", "h", "dh", "du", "v")
        g = mosaic_gpu_fwd.Gates(fr_s, fc_s, interpret)
        q, k, u, h, dh, du, v = wgmma_operands((q_s, k_s, u_s, h_s, dh_s, du_s, v_s), interpret)
        # W = T kg: dW = -dU S^T; dT = dU (beta V)^T + dW (K kg_scale)^T; dkg = T^T dW; through
        # U's end state: (U dS_next^T) e_end
        dw, dt_v, dk_end = mma(((zero(ck), [(du, Transposed(h))]),
                                (zero(cc), [(du, Transposed(v))]),
                                (zero(ck), [(u, Transposed(dh))])), interpret)  # fmt: skip
        publish(dw_s, -dw)
        dk_acc = dk_end * g.t("e_end", dk)
        de = row_sum(dk_acc * tile(k_s))
        wait("t")
        (t, dw) = wgmma_operands((t_s, dw_s), interpret)
        dt_w, dkg = mma(((zero(cc), [(dw, Transposed(k))]), (zero(ck), [(Transposed(t), dw)])),
                        interpret)  # fmt: skip
        publish(cc_s, dt_v * g.s("beta") + dt_w * g.s("kg_scale"))
        dk_acc += dkg * g.t("kg_scale", dk)
        dkg_k = row_sum(dkg * tile(k_s))
        dbeta, dgam_c = dkg_k * g.vector("g_read"), dkg_k * g.vector("kg_scale") - de
        # T = (I + A)^{-1}: dA = -T^T dT T^T; A = K K^T * decay_strict * beta_t
        x, kk = mma(((zero(cc), [(Transposed(t), cc_s)]), (zero(cc), [(k, Transposed(k))])),
                    interpret)  # fmt: skip
        (dkk,) = mma(((zero(cc), [(x.astype(DTYPE), Transposed(t))]),), interpret)
        dkk = -dkk * g.decay(strict=True)
        dbeta += row_sum(dkk * kk)
        dkk = dkk * g.t("beta")
        da_a = dkk * kk
        publish(cc_s, dkk)  # dT's last read is done
        plgpu.barrier_wait(handoff.at[0])
        (ds,) = wgmma_operands((ds_s,), interpret)
        products = [(dkk.astype(DTYPE), k), (Transposed(cc_s), k), (Transposed(ds), q)]
        (dk_acc,) = mma(((dk_acc, products),), interpret)
        copy_out(k_s, dk_acc, dk_ref.at[batch, rows, head])
        for i, x in enumerate((dbeta, dgam_c + row_sum(da_a), de)):
            ro_s.at[i][...] = x
        co_s.at[0][...] = -col_sum(da_a)
        plgpu.commit_smem()
        plgpu.barrier_wait(handoff.at[1])
        plgpu.copy_smem_to_gmem(ro_s, ro_ref.at[batch, head, n])
        plgpu.copy_smem_to_gmem(co_s, co_ref.at[batch, head, n])
        plgpu.wait_smem_to_gmem(0)


def gradients(inputs: dict, res: tuple, do: jax.Array, dh: jax.Array, du: jax.Array,
              ds0: jax.Array, cfg: Cfg):  # fmt: skip
    """:func:`.triton_bwd.gradients` in one Pallas Mosaic GPU kernel (bf16, ``dk`` and ``dv``
    in :data:`.mosaic_gpu_fwd.GRAD_DIMS`): one CTA of two warpgroups per chunk with
    all of the chunk's operands in shared memory (``4 C dv + 4 C dk + 2 dk dv + 3 C^2`` bf16
    values: 222 KiB with the factors at ``dk = dv = 128``, one CTA per SM), every product a
    ``wgmma`` (:func:`_grad_kernel`); the last row's ``dL/dgam_last`` (the state carry's and
    the end-state rows') and the two warpgroups' parts summed in XLA from the kernel's per-row
    and per-column parts."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    bsz, length, heads, dk = q.shape
    dv, n_chunks = v.shape[-1], length // CHUNK
    h, t_mat, u = res
    rows, cols = mosaic_gpu_fwd.factors(inputs, cfg)
    out_type = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct((bsz, heads, n_chunks, ROW_PARTS + dk // ROWS, CHUNK), F32),
        jax.ShapeDtypeStruct((bsz, heads, n_chunks, COL_PARTS, CHUNK), F32),
    )
    dq, dk_grad, dv_grad, per_row, per_col = mosaic_gpu_fwd.per_chunk(
        _grad_kernel, out_type, grad_scratch(dk, dv), bsz * heads * n_chunks, cfg.interpret,
        "gated delta mosaic gradient kernel", "gated_delta_grads", warpgroups=2,
    )(q, k, v, u, do.astype(DTYPE), du, t_mat, h, dh, rows, cols)  # fmt: skip
    part = lambda i: per_row[..., i, :]  # noqa: E731
    dbeta, dgam_c, de = part(0) + part(3), part(1) + part(4), part(2)
    dlast = chunk_carry(inputs, cfg) * jnp.sum(per_row[..., ROW_PARTS:, :], axis=(-2, -1))
    dgam_c = dgam_c.at[..., -1].add(dlast + jnp.sum(de, axis=-1))
    col = lambda x: rearrange(x, "b h n c -> b h (n c) 1")  # noqa: E731
    dgam_r = jnp.sum(per_col, axis=-2, keepdims=True)
    return dq, dk_grad, dv_grad, col(dbeta), col(dgam_c), dgam_r, ds0


__all__ = ["backward", "carries", "chunk_carry", "gradients", "state_grads"]
