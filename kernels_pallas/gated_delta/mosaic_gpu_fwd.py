"""Hopper forward of the gated delta rule: the UT transform in parallel, then one fused pass.

Every chunk's ``W = T kg``, ``UV = T beta V`` and ``T`` come first, parallel over chunks, by
:func:`ut_transform`, a Pallas Mosaic GPU kernel with every product a ``wgmma`` (it replaced
Triton's :func:`.triton_fwd.prepare` here when measured faster on an H100:
``experiments/results/bench_gated_delta_mosaic_full.md``). The fused Pallas Mosaic GPU
kernel of the linear-attention scan
(:func:`kernels_pallas.linear_attention_scan.mosaic_gpu_fwd.forward_delta`) then walks the
chunks in order with the state tile on chip: its state warpgroup forms ``U = UV - W S`` and
publishes it with ``S``, its output warpgroup computes ``O = (Q g_read) S + (Q K^T *
decay_incl) U``, as :func:`._chunk.state_step` and :func:`._chunk.output`. Against the three
Triton kernels this drops the state pass's store of ``U`` and every chunk's state and the
output kernel's reads of them. The backward (:mod:`.mosaic_gpu_bwd`) starts from the states
and the ``U`` this pass saves, ``T`` and (:func:`mosaic_backward`) ``W``.

:func:`ut_transform`: one warpgroup per chunk (one CTA; 58 KiB of shared memory at ``dk = dv =
128``, so three share an SM). It forms ``A = (K K^T) * exp(gam_t - gam_s) * beta_t`` (``s <
t``, one document) and ``T = (I + A)^{-1}`` by the block doubling of
:func:`._chunk.unit_lower_inverse`, each doubling's two products one ``wgmma`` on float16
operands (:data:`PRODUCT`; the left one in registers, the right one published to shared
memory), then ``W = (T * kg_scale_s) K`` and ``UV = (T * beta_s) V``: ``T``'s columns scaled in
registers and rounded to the input dtype, ``K`` and ``V`` as loaded (Triton rounds ``T`` and
``K kg_scale``, ``V beta`` instead: one rounding of each factor either way). ``T`` is rounded to
bf16 before those products and when saved, so its float16 products (``T`` within ``2^-11`` of
float64) leave ``W`` and ``UV`` as accurate as three-pass bf16 products (about 16 bits) did,
in a third of the ``wgmma`` s. Interpret mode runs the same kernel with ``jnp`` products
(:func:`kernels_pallas._hopper.mma`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas._hopper import (
    ROWS,
    SMEM_BYTES,
    WGMMA_TRANSFORMS,
    Transposed,
    interpret_params,
    iota,
    mma,
    smem_footprint,
    vector,
    wgmma_operands,
    zero_acc,
)
from kernels_pallas.gated_delta._chunk import F32, Cfg
from kernels_pallas.linear_attention_scan import mosaic_gpu_fwd as fused

CHUNK = fused.CHUNK
# the operand dtype of the UT transform's doubling products: float16's 11-bit mantissa (as
# TF32's, Triton's path) where bfloat16 has 8; T's entries stay far inside its range (|T| <= 1
# seen for unit-norm keys and beta in (0, 1), random and near-collinear; one past 65504 would
# give inf, not a quiet error)
PRODUCT = jnp.float16


GRAD_DIMS = (64, 128)  # the dk and dv of the backward's gradient kernel (a chunk's dv in one CTA)


def mosaic_backward(q: jax.Array, v: jax.Array) -> bool:
    """Whether :mod:`.mosaic_gpu_bwd`'s kernels serve this call's backward: bf16, ``dk`` and
    ``dv`` in :data:`GRAD_DIMS` (else Triton's; the forward saves ``W`` only for the former)."""
    return q.dtype == jnp.bfloat16 and q.shape[-1] in GRAD_DIMS and v.shape[-1] in GRAD_DIMS


def check_supported(q: jax.Array, v: jax.Array, *, chunk: int) -> None:
    """Raise ``ValueError`` naming what the fused forward does not support (before tracing)."""
    fused.check_supported(q, v, chunk=chunk, who="gated_delta_rule")


def factors(inputs: dict, cfg: Cfg) -> tuple[jax.Array, jax.Array]:
    """Per chunk, float32 ``[batch, heads, chunks, n, C]``, the gates of :func:`._chunk.gates`
    and ``beta``: read along rows (``t``, ``n = 6``) ``gam``, the document index, ``beta``,
    ``g_read = exp(gam)`` where the row reads the incoming state, ``e_end = exp(gam_last -
    gam)`` where it reaches the outgoing one, ``kg_scale = beta g_read``; along columns (``s``,
    ``n = 4``) ``gam``, the document index, ``kg_scale``, ``beta``. (Two buffers:
    :func:`.fused.gate_factors` says why.)"""
    chunked = lambda x: rearrange(x, "b h (n c) 1 -> b h n c", c=CHUNK)  # noqa: E731
    gam, beta = chunked(inputs["gam_c"]), chunked(inputs["beta_c"])
    doc, g_read = jnp.zeros_like(gam), jnp.exp(gam)
    e_end = jnp.exp(jnp.minimum(gam[..., -1:] - gam, 0.0))
    if cfg.segments:
        tokens = lambda x: rearrange(x.astype(F32), "b (n c) 1 -> b 1 n c", c=CHUNK)  # noqa: E731
        doc = jnp.broadcast_to(tokens(inputs["doc_c"]), gam.shape)
        g_read, e_end = g_read * tokens(inputs["reads"]), e_end * tokens(inputs["last"])
    rows = jnp.stack([gam, doc, beta, g_read, e_end, beta * g_read], axis=-2)
    return rows, jnp.stack([gam, doc, beta * g_read, beta], axis=-2)


def chunk_program(heads: int, length: int) -> tuple:
    """``(batch, head, chunk, rows)`` of this CTA, program id ``p = (batch * heads + head) *
    chunks + chunk``: its ``CHUNK`` token rows ``rows``."""
    n_chunks = length // CHUNK
    pid = lax.axis_index("p")
    head_of, n = lax.div(pid, n_chunks), lax.rem(pid, n_chunks)
    batch, head = lax.div(head_of, heads), lax.rem(head_of, heads)
    return batch, head, n, pl.ds(pl.multiple_of(n * CHUNK, CHUNK), CHUNK)


def per_chunk(kernel, out_type, scratch, chunks: int, interpret: bool, who: str, name: str,
              warpgroups: int = 1):  # fmt: skip
    """``plgpu.kernel`` of ``kernel(*refs, interpret=...)`` with one CTA (of ``warpgroups``
    warpgroups, axis "wg") per chunk: grid ``(chunks,)`` named "p" (:func:`chunk_program`), the
    kernel named ``name`` (as profiles list it); ``ValueError`` naming ``who`` when ``scratch``
    needs more shared memory than an SM has."""
    if (need := smem_footprint(scratch)) > SMEM_BYTES:
        raise ValueError(f"{who}: needs {need} B of shared memory > {SMEM_BYTES}")
    return plgpu.kernel(
        functools.partial(kernel, interpret=interpret),
        out_type=out_type,
        scratch_types=scratch,
        grid=(chunks,),
        grid_names=("p",),
        kernel_name=name,
        interpret=interpret_params() if interpret else None,
        **(dict(num_threads=warpgroups, thread_name="wg") if warpgroups > 1 else {}),
    )


def load_chunk(copies: dict, gate_refs: tuple, ready, issuer=None):
    """Issue the TMA copies ``name -> (src, dst)`` and those of this CTA's chunk of
    :func:`factors` (``gate_refs = (rows_ref, cols_ref, rows_smem, cols_smem)``, named "rows"
    and "cols"), one barrier of ``ready`` each (in order); returns ``wait(*names)``, which
    waits for those. ``issuer``: with several warpgroups, the (traced) condition of the one
    that issues them."""
    rows_ref, cols_ref, rows_smem, cols_smem = gate_refs
    batch, head, n, _ = chunk_program(rows_ref.shape[1], rows_ref.shape[2] * CHUNK)
    copies = {"rows": (rows_ref.at[batch, head, n], rows_smem),
              "cols": (cols_ref.at[batch, head, n], cols_smem), **copies}  # fmt: skip
    index = {name: i for i, name in enumerate(copies)}

    def issue() -> None:
        for i, (src, dst) in enumerate(copies.values()):
            plgpu.copy_gmem_to_smem(src, dst, ready.at[i])

    if issuer is None:
        issue()
    else:
        pl.when(issuer)(issue)

    def wait(*names: str) -> None:
        for name in names:
            plgpu.barrier_wait(ready.at[index[name]])

    return wait


class Gates:
    """One chunk's :func:`factors` in registers (loaded by :func:`load_chunk`'s "rows" and
    "cols" copies), broadcast on demand: :meth:`t` along rows (per token ``t``), :meth:`s`
    along columns (per token ``s``)."""

    ROWS = ("gam", "doc", "beta", "g_read", "e_end", "kg_scale")
    COLS = ("gam", "doc", "kg_scale", "beta")

    def __init__(self, rows_smem, cols_smem, interpret: bool):
        self.interpret = interpret
        self._t = {n: vector(rows_smem.at[i], 0, interpret) for i, n in enumerate(self.ROWS)}
        self._s = {n: vector(cols_smem.at[i], 1, interpret) for i, n in enumerate(self.COLS)}

    def t(self, name: str, columns: int = CHUNK) -> jax.Array:
        """Row factor ``name`` ``[C, columns]``."""
        return lax.broadcast_in_dim(self._t[name], (CHUNK, columns), (0,))

    def s(self, name: str) -> jax.Array:
        """Column factor ``name`` ``[C, C]``."""
        return lax.broadcast_in_dim(self._s[name], (CHUNK, CHUNK), (1,))

    def vector(self, name: str) -> jax.Array:
        """Row factor ``name`` ``[C]``."""
        return self._t[name]

    def decay(self, *, strict: bool) -> jax.Array:
        """``exp(gam_t - gam_s)`` for ``s < t`` (``strict``) or ``s <= t`` in one document,
        else 0 (:func:`._chunk.decay`)."""
        row, col = (iota((CHUNK, CHUNK), d, self.interpret) for d in (0, 1))
        keep = ((col < row) if strict else (col <= row)) & (self.t("doc") == self.s("doc"))
        return jnp.where(keep, jnp.exp(jnp.where(keep, self.t("gam") - self.s("gam"), 0.0)), 0.0)


def _value_blocks(dv: int) -> int:
    """Columns per ``UV`` product: 128 where they divide ``dv``, else 64."""
    return 128 if dv % 128 == 0 else ROWS


def _ut_kernel(k_ref, v_ref, fr_ref, fc_ref, w_ref, uv_ref, *refs, save_t: bool,
               interpret: bool):  # fmt: skip
    """One CTA (one warpgroup) per chunk, program id ``p = (batch * heads + head) * chunks +
    chunk`` (module doc)."""
    t_ref = refs[0] if save_t else None
    (k_smem, v_smem, x_pub, t_pub, t_out, fr_smem, fc_smem), ready = refs[save_t:]
    _, length, heads, dk = k_ref.shape
    dv, dtype = v_ref.shape[-1], k_ref.dtype
    batch, head, n, rows = chunk_program(heads, length)
    wait = load_chunk(
        {"k": (k_ref.at[batch, rows, head], k_smem), "v": (v_ref.at[batch, rows, head], v_smem)},
        (fr_ref, fc_ref, fr_smem, fc_smem),
        ready,
    )
    wait("rows", "cols", "k")  # V's load goes on under the inverse
    shape = (CHUNK, CHUNK)
    g = Gates(fr_smem, fc_smem, interpret)
    (k,) = wgmma_operands((k_smem,), interpret)
    (kk,) = mma(((zero_acc(shape, interpret), [(k, Transposed(k))]),), interpret)
    row, col = iota(shape, 0, interpret), iota(shape, 1, interpret)
    a = kk * g.decay(strict=True) * g.t("beta")

    def cross(size: int) -> jax.Array:  # as in _chunk.unit_lower_inverse
        return ((row ^ col) < 2 * size) & ((row & size) != 0) & ((col & size) == 0)

    def product(x, pub):  # x @ (the value published in pub), float16 operands
        return mma(((zero_acc(shape, interpret), [(x.astype(PRODUCT), pub)]),), interpret)[0]

    t = jnp.where(row == col, 1.0, 0.0) - jnp.where(cross(1), a, 0.0)
    size = 2
    while size < CHUNK:  # T <- T - T (A on the cross blocks) T
        x_pub[...] = jnp.where(cross(size), a, 0.0).astype(PRODUCT)
        t_pub[...] = t.astype(PRODUCT)
        plgpu.commit_smem()
        t = t - product(product(t, x_pub), t_pub)
        size *= 2
    wait("v")
    (v,) = wgmma_operands((v_smem,), interpret)
    (w,) = mma(((zero_acc((CHUNK, dk), interpret), [((t * g.s("kg_scale")).astype(dtype), k)]),),
               interpret)  # fmt: skip
    k_smem[...] = w.astype(dtype)  # K's last read is done: its buffer stages W
    tv, vb = (t * g.s("beta")).astype(dtype), _value_blocks(dv)
    for j in range(dv // vb):
        cols = pl.ds(j * vb, vb)
        v_j = v[:, j * vb : (j + 1) * vb] if interpret else v.at[:, cols]
        (uv,) = mma(((zero_acc((CHUNK, vb), interpret), [(tv, v_j)]),), interpret)
        v_smem.at[:, cols][...] = uv.astype(dtype)
    if save_t:
        t_out[...] = t.astype(t_out.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, w_ref.at[batch, head, rows])
    plgpu.copy_smem_to_gmem(v_smem, uv_ref.at[batch, head, rows])
    if save_t:
        plgpu.copy_smem_to_gmem(t_out, t_ref.at[batch, head, n])
    plgpu.wait_smem_to_gmem(0)


def ut_scratch(dtype, store, dk: int, dv: int) -> tuple:
    """``K`` (then ``W``), ``V`` (then ``UV``), the doubling's masked ``A`` and ``T`` published
    in :data:`PRODUCT`, ``T``'s staging in ``store``, the factors; one barrier per load."""
    mat = lambda *shape, dt=dtype: plgpu.SMEM(shape, dt, transforms=WGMMA_TRANSFORMS)  # noqa: E731
    return (
        (
            mat(CHUNK, dk),
            mat(CHUNK, dv),
            *(mat(CHUNK, CHUNK, dt=PRODUCT) for _ in range(2)),
            mat(CHUNK, CHUNK, dt=store),
            plgpu.SMEM((6, CHUNK), F32),
            plgpu.SMEM((4, CHUNK), F32),
        ),
        plgpu.Barrier(num_barriers=4),
    )


def ut_transform(inputs: dict, cfg: Cfg, *, save_t: bool):
    """:func:`.triton_fwd.prepare` in Pallas Mosaic GPU (module doc): ``(W [batch, heads,
    len, dk], UV [batch, heads, len, dv])`` in the input dtype and, with ``save_t``, ``T
    [batch, heads, chunks, C, C]`` in :attr:`Cfg.store` (else None)."""
    k, v = inputs["k"], inputs["v"]
    bsz, length, heads, dk = k.shape
    dv = v.shape[-1]
    n_chunks = length // CHUNK
    out_type = [
        jax.ShapeDtypeStruct((bsz, heads, length, dk), k.dtype),
        jax.ShapeDtypeStruct((bsz, heads, length, dv), k.dtype),
    ]
    if save_t:
        out_type.append(jax.ShapeDtypeStruct((bsz, heads, n_chunks, CHUNK, CHUNK), cfg.store))
    outs = per_chunk(
        functools.partial(_ut_kernel, save_t=save_t), tuple(out_type),
        ut_scratch(k.dtype, cfg.store, dk, dv), bsz * heads * n_chunks, cfg.interpret,
        f"gated delta mosaic UT transform (dk={dk}, dv={dv})", "gated_delta_ut",
    )(k, v, *factors(inputs, cfg))  # fmt: skip
    return outs[0], outs[1], (outs[2] if save_t else None)


def forward(inputs: dict, s0: jax.Array, cfg: Cfg, *, save_states: bool):
    """``(o, s_final, res)`` as :func:`.triton_fwd.forward` (same operands by name)."""
    dtype = inputs["q"].dtype
    w, uv, t_mat = ut_transform(inputs, cfg, save_t=save_states)
    w, uv = w.astype(dtype), uv.astype(dtype)
    b = rearrange(inputs["gam_c"], "b h l 1 -> b l h 1")
    seg = None
    if cfg.segments:  # document index of each token and of its predecessor
        r = inputs["doc_c"]
        seg = (r, jnp.concatenate([r[:, :1], r[:, :-1]], axis=1))
    o, s_final, saved = fused.forward_delta(
        inputs["q"], inputs["k"], w, uv, b, s0, seg, save_states=save_states,
        interpret=cfg.interpret,
    )  # fmt: skip
    if not save_states:
        return o, s_final, None
    h, u = (x.astype(cfg.store) for x in saved)
    # W too where the Mosaic GPU backward's state pass reads it
    keep_w = mosaic_backward(inputs["q"], inputs["v"])
    return o, s_final, (h, t_mat, u, *((w,) if keep_w else ()))
