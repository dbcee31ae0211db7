"""Pre-norm decoder stack (RMSNorm, RoPE, GQA, SwiGLU), reused by every model family.

``TransformerConfig`` describes one stack; the models (transformer LM, HAT's encoder /
backbone / decoder, Block Transformer's block and token decoders) each hold one or more.
Layers run under ``nn.scan`` (compile time flat in depth) with a selectable remat policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from arjax.config import check, check_field_types, check_positive
from arjax.nn.layers import Attention, Mode, RMSNorm, RopeScaling, SwiGLU
from arjax.nn.linear_attention import AttentionMixerConfig, MixerConfig, make_mixer
from arjax.nn.partitioning import constrain
from arjax.ops.attention import IMPLS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT = ("none", "full", "dots", "dots_no_batch", "dots_attention")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """One decoder stack. ``window`` None means full causal attention, else each query sees
    its ``window`` latest keys (itself included). ``rope_scaling``: Llama 3.1 frequency
    rescaling (:class:`arjax.nn.layers.RopeScaling`; the default changes nothing)."""

    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    mlp_dim: int = 768
    window: int | None = None
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = RopeScaling()
    qk_norm: bool = False
    norm_eps: float = 1e-6
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attention_impl: Literal["auto", "xla", "cudnn", "pallas"] = "auto"
    remat: Literal["none", "full", "dots", "dots_no_batch", "dots_attention"] = "none"
    scan_layers: bool = True
    mixer: MixerConfig = AttentionMixerConfig()  # token mixer; "attention": the fields above
    final_norm: bool = True  # False: the stack returns its residual stream un-normalised

    def __post_init__(self) -> None:
        check_field_types(self)
        check_positive(self, "d_model", "num_layers", "num_heads", "num_kv_heads")
        check_positive(self, "head_dim", "mlp_dim")
        check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}",
        )
        check(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        check(
            self.window is None or (isinstance(self.window, int) and self.window > 0),
            "window",
            f"must be None or a positive int, got {self.window!r}",
        )
        check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        check(self.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")
        check(
            self.attention_impl in IMPLS,
            "attention_impl",
            f"must be one of {list(IMPLS)}, got {self.attention_impl!r}",
        )
        check(self.remat in REMAT, "remat", f"must be one of {list(REMAT)}, got {self.remat!r}")
        check(
            isinstance(self.mixer, MixerConfig),
            "mixer",
            f"must be one of the MixerConfig classes, got {type(self.mixer).__name__}",
        )
        if self.mixer.kind != "attention":
            self._check_attention_fields_unset()

    def _check_attention_fields_unset(self) -> None:
        """A linear mixer ignores the attention-only fields: each must keep its neutral value
        (one error naming every field that does not)."""
        defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
        neutral = {
            "num_kv_heads": self.num_heads,  # one key/value per head
            "window": None,
            "qk_norm": False,
            "attention_impl": defaults["attention_impl"],
        }
        if self.mixer.kind != "based":  # BASED's sliding-window attention uses RoPE
            neutral["rope_theta"] = defaults["rope_theta"]
        unused = [n for n, v in neutral.items() if getattr(self, n) != v]
        check(
            not unused,
            ", ".join(unused),
            f"not used by the {self.mixer.kind!r} mixer (got "
            f"{', '.join(f'{n}={getattr(self, n)!r}' for n in unused)}); these attention-only "
            f"fields must stay {', '.join(f'{n}={neutral[n]!r}' for n in unused)}",
        )

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def stack_fields(self) -> TransformerConfig:
        """This config's stack part (drops fields that subclasses add)."""
        names = {f.name for f in dataclasses.fields(TransformerConfig)}
        return TransformerConfig(**{n: getattr(self, n) for n in names})

    def num_params(self) -> int:
        """Parameters of the stack (no embeddings)."""
        attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.d_model * self.mlp_dim
        norms = 2 * self.d_model + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_layers * (attn + mlp + norms) + self.d_model

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token: 2 x matmul params + causal attention over ``context``."""
        matmul = self.num_layers * (
            self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
            + 3 * self.d_model * self.mlp_dim
        )
        ctx = context if self.window is None else min(context, self.window)
        attn = self.num_layers * 2 * self.num_heads * self.head_dim * ctx  # QK^T + PV, causal avg
        return 2.0 * matmul + attn


class Block(nn.Module):
    """``x + mixer(norm(x))``, then ``x + mlp(norm(x))``.

    The mixer is :class:`Attention` unless ``config.mixer.kind`` names a linear-attention
    mixer (:mod:`arjax.nn.linear_attention`), which keeps a recurrent state in ``cache``.
    """

    config: TransformerConfig
    mode: Mode = "train"
    cache_len: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: dict) -> tuple[jax.Array, None]:
        """``ctx`` holds the per-call arrays shared by all layers (broadcast under scan)."""
        c = self.config
        h = RMSNorm(c.norm_eps, name="attn_norm")(x)
        if c.mixer.kind == "attention":
            h = Attention(
                num_heads=c.num_heads,
                num_kv_heads=c.num_kv_heads,
                head_dim=c.head_dim,
                rope_theta=c.rope_theta,
                rope_scaling=c.rope_scaling,
                window=c.window,
                qk_norm=c.qk_norm,
                dtype=c.compute_dtype,
                impl=c.attention_impl,
                name="attn",
            )(
                h,
                q_positions=ctx["positions"],
                q_segment_ids=ctx["segment_ids"],
                kv_segment_ids=ctx["segment_ids"],
                mode=self.mode,
                cache_len=self.cache_len,
                cache_index=ctx["cache_index"],
                kv_visible=ctx["kv_visible"],
            )
        else:
            mixer = make_mixer(
                c.mixer,
                num_heads=c.num_heads,
                head_dim=c.head_dim,
                rope_theta=c.rope_theta,
                rope_scaling=c.rope_scaling,
                dtype=c.compute_dtype,
                name="mixer",
            )
            h = mixer(h, positions=ctx["positions"], segment_ids=ctx["segment_ids"], mode=self.mode)
        x = x + h
        h = RMSNorm(c.norm_eps, name="mlp_norm")(x)
        x = x + SwiGLU(c.mlp_dim, dtype=c.compute_dtype, name="mlp")(h)
        return x, None


def cast_weights(params: Any, dtype: Any) -> Any:
    """An unrolled stack's params with every float matrix (``ndim >= 2``) in ``dtype``, the
    stack's ``compute_dtype``: its layers cast them so at every use, so casting once before a
    decoding loop gives the same bits without a cast (and a float32 read) per step. Vectors
    (norm scales, used in float32) are kept; ``ValueError`` on a scanned stack (whose norm
    scales are ``[layers, d]``)."""
    if "layers" in params:
        raise ValueError("cast_weights: the stack is scanned; unroll it first (unrolled)")

    def cast(x: jax.Array) -> jax.Array:
        return x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, params)


# Input (contracted) axes of the kernels of Attention and SwiGLU and of the models' LM heads,
# by module name: an output projection's kernel is [heads, head_dim, embed], every other one
# [in, ...].
PROJECTION_INPUT_AXES = {
    "q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
    "down_proj": 1, "lm_head": 1,
}  # fmt: skip


def inputs_last(params: Any, *, inverse: bool = False) -> Any:
    """``params`` with every attention and MLP kernel and LM head (found by module name,
    ``PROJECTION_INPUT_AXES``) holding its input (contracted) axes last; ``inverse``: back
    first, the layout the layers read. Decoding keeps them so: at a few rows XLA turns
    ``x @ W`` into a multiply and a sum over ``W``'s input axes, which it fuses into one kernel
    when those axes are minor in memory, and otherwise writes the weight-sized product out and
    sums it in a second kernel. Other leaves are returned as is."""

    def move(path: tuple, x: jax.Array) -> jax.Array:
        *_, module, leaf = (None, None, *(getattr(k, "key", None) for k in path))
        n = PROJECTION_INPUT_AXES.get(module) if leaf == "kernel" else None
        if n is None:
            return x
        n = x.ndim - n if inverse else n
        return jnp.transpose(x, (*range(n, x.ndim), *range(n)))

    return jax.tree_util.tree_map_with_path(move, params)


def unrolled(config: TransformerConfig, params: Any) -> tuple[TransformerConfig, Any]:
    """A scanned stack's config and params as the equivalent unrolled stack.

    ``params["layers"]`` (leaves ``[num_layers, ...]``) becomes ``layers_0 .. layers_{L-1}``.
    Decoding wants this: under ``nn.scan`` the stacked KV cache is sliced out and written
    back whole at every step, unrolled each layer updates its own cache in place. A stack
    that is not scanned is returned as is; ``ValueError`` if ``params`` do not match ``config``.
    """
    if not config.scan_layers:
        return config, params
    if "layers" not in params:
        raise ValueError(
            f"unrolled: config.scan_layers is True but params have no 'layers' entry "
            f"(keys {sorted(params)}); are they unrolled already?"
        )
    depths = {x.shape[0] for x in jax.tree.leaves(params["layers"])}
    if depths != {config.num_layers}:
        raise ValueError(
            f"unrolled: params['layers'] stack {sorted(depths)} layers, "
            f"config.num_layers={config.num_layers}; configs mismatch"
        )
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(config.num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return dataclasses.replace(config, scan_layers=False), out


def _remat_policy(name: str) -> Any:
    """What the backward pass keeps from the forward; the rest is recomputed. ``dots_attention``
    also keeps the flash-attention kernel's output and log-sum-exp (named in
    ``kernels_pallas.flash_attention``), so its forward kernel is not run twice."""
    policies = jax.checkpoint_policies
    return {
        "full": None,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.checkpoint_dots_with_no_batch_dims,
        "dots_attention": policies.save_from_both_policies(
            policies.checkpoint_dots_with_no_batch_dims,
            policies.save_only_these_names("attention_out", "attention_lse"),
        ),
    }[name]


class Transformer(nn.Module):
    """A stack of :class:`Block` plus the final RMSNorm (unless ``config.final_norm`` is False).

    x ``[batch, len, d_model]`` -> ``[batch, len, d_model]``. ``mode`` as in
    :class:`arjax.nn.layers.Attention`; in ``prefill``/``decode`` the K/V cache lives in
    the ``cache`` collection (stacked over layers when scanned).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,  # [batch, len]
        segment_ids: jax.Array | None = None,  # [batch, len]
        mode: Mode = "train",
        cache_len: int | None = None,
        cache_index: jax.Array | None = None,
        kv_visible: jax.Array | None = None,  # [batch, cache_len] (decode)
    ) -> jax.Array:
        c = self.config.stack_fields()
        ctx = dict(
            positions=positions,
            segment_ids=segment_ids,
            cache_index=cache_index,
            kv_visible=kv_visible,
        )
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=_remat_policy(c.remat), static_argnums=())
        # Activations: batch-sharded, features whole (no-op outside activation_mesh).
        x = constrain(x.astype(c.compute_dtype), ("batch", "seq", "act_embed"))
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(c, mode, cache_len, name="layers")(x, ctx)
        else:
            for i in range(c.num_layers):
                x, _ = block(c, mode, cache_len, name=f"layers_{i}")(x, ctx)
        return RMSNorm(c.norm_eps, name="final_norm")(x) if c.final_norm else x
