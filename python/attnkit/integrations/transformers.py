"""attnkit inside Hugging Face transformers 5.x models.

Two entry points, both needing ``transformers>=5,<6`` (imported on first call, never at import):

``register()``
    Registers the attention implementation ``"attnkit"`` with transformers' ``AttentionInterface``
    and its mask builder with ``AttentionMaskInterface``. Afterwards any model written on the
    attention interface (Llama, Qwen2, Mistral, ...) runs on attnkit's flash core with
    ``from_pretrained(..., attn_implementation="attnkit")`` or ``model.set_attn_implementation("attnkit")``.

``patch(model)``
    Replaces, in place, the attention of the layers whose mechanism attnkit implements:
    ``DogeAttention`` (dynamic mask attention) and ``MiniMaxLightningAttention`` (lightning
    attention). Weights, buffers and the state dict are untouched; ``model._attnkit_patched`` lists
    the qualified names of the patched modules.

What the ``"attnkit"`` attention function does with each mask it can be handed:

- ``None``: plain attention, causal (bottom-right aligned, so KV-cache decode steps with
  ``Lq < Lk`` are right) when the module is causal; no ``[L, L]`` mask anywhere.
- a 2-D bool key mask ``[B, Lk]`` (what the attnkit mask builder returns for causal or sliding
  window masks with padding, left or right): the keys that are ``False`` are excluded through
  ``masked_bias_attention``'s broadcast mask ``[B, 1, 1, Lk]``; still no ``[L, L]`` mask. Query rows
  that see no key (a left-padded prefix) output 0.
- ``sliding_window`` (passed by the model, like for flash attention): key ``j`` is seen by query
  ``i`` iff ``0 <= (i + Lk - Lq) - j < sliding_window``. The flash core's window is not exposed by
  the public ops, so the queries are processed in chunks of at most ``WINDOW_CHUNK`` rows; each chunk
  attends to the key slice it can reach with a bool window mask of the chunk's size only.
- a 4-D bool mask ``[B|1, H|Hkv|1, Lq, Lk]`` (the documented fallback the mask builder returns for
  everything else: packed sequences, chunked or bidirectional attention, static caches, custom mask
  functions) is applied exactly with ``masked_bias_attention(attn_mask=...)``.
- a 4-D float mask (a custom additive mask passed by the user) is added to the scores exactly as
  eager attention does, through ``masked_bias_attention(attn_bias=...)``.
- anything else (flex ``BlockMask``, other ranks) raises a ``TypeError``/``ValueError``.

Dropout must be 0 (``model.eval()`` or ``attention_dropout=0``), otherwise a ``ValueError`` is
raised; ``softcap`` and attention sinks are refused the same way. On CUDA the ops take float16 and
bfloat16 with head dims 32, 64, 96, 128 or 256; CPU takes float32 and float64 as well.
"""

from __future__ import annotations

import logging
import sys
import types
import weakref

import torch
import torch.nn.functional as F

import attnkit

__all__ = ["ATTN_IMPLEMENTATION", "register", "patch", "attnkit_attention_forward", "attnkit_mask"]

ATTN_IMPLEMENTATION = "attnkit"
WINDOW_CHUNK = 512  # query rows per chunk of sliding-window attention

logger = logging.getLogger(__name__)

# Configs of models whose every attention layer is patched by `patch` and reads the attnkit mask
# builder's compact masks, even where the model asks for a materialised mask (Doge does, for its
# own dense dynamic mask). Keyed by id(config); entries vanish with the config.
_COMPACT_CONFIGS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "attnkit.integrations.transformers needs Hugging Face transformers 5.x: pip install 'transformers>=5,<6'"
        ) from e
    major = int(transformers.__version__.split(".")[0])
    if major != 5:
        raise ImportError(
            f"attnkit.integrations.transformers supports transformers 5.x, found {transformers.__version__}"
        )
    return transformers


# ------------------------------------------------------------------------------------------------
# Mask builder (AttentionMaskInterface)
# ------------------------------------------------------------------------------------------------


def _closure_values(fn):
    return [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]


def _mask_kind(mask_function, local_size):
    """``"causal"`` for transformers' plain causal mask function, ``"sliding"`` for its plain
    sliding-window causal mask function (with the window equal to ``local_size``), else None."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return "causal"
    if local_size is None or getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = [v for v in _closure_values(mask_function) if isinstance(v, tuple)]
    if len(parts) != 1 or len(parts[0]) != 2:
        return None
    overlay, causal = parts[0]
    if causal is not mu.causal_mask_function:
        return None
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask":
        return None
    if _closure_values(overlay) != [local_size]:
        return None
    return "sliding"


def attnkit_mask(
    batch_size,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask=None,
    local_size=None,
    allow_is_causal_skip=True,
    use_vmap=False,
    config=None,
    **kwargs,
):
    """The mask builder registered with ``AttentionMaskInterface`` under ``"attnkit"``.

    For transformers' plain causal or sliding-window causal mask, with the queries ending where
    the keys end (dynamic caches, no cache), it returns ``None`` (no padding) or the 2-D bool key
    mask ``[B, kv_length]``: no ``[L, L]`` tensor is built. Everything else (packed sequences,
    or/and mask functions, chunked or bidirectional masks, static caches, a caller that asks for a
    materialised mask) gets transformers' own dense 4-D bool mask, which the attention function
    applies exactly.
    """
    from transformers.masking_utils import sdpa_mask

    forced = config is not None and _COMPACT_CONFIGS.get(id(config)) is config
    kind = _mask_kind(mask_function, local_size) if mask_function is not None else "causal"
    compact = kind is not None and not use_vmap and (allow_is_causal_skip or forced)
    aligned = (
        isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and kv_offset + kv_length == q_offset + q_length
    )
    if compact and aligned and attention_mask is not None and attention_mask.dim() == 2:
        seen = attention_mask.shape[-1]
        if kind == "causal" and kv_offset == 0 and q_offset == 0 and kv_length == q_length < seen:
            # sizes read from a cache layer that holds no keys (MiniMax sizes its full-attention mask
            # from its first, linear, layer): the 2-D mask covers every token a full layer has seen.
            # The attention function checks that its keys are exactly these tokens.
            kv_length = seen
    if compact and aligned:
        if attention_mask is None:
            return None
        if attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_offset + kv_length:
            keys = attention_mask[:, attention_mask.shape[-1] - kv_length :].to(torch.bool)
            if not torch.compiler.is_compiling() and bool(keys.all()):
                return None
            return keys
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function if mask_function is not None else _causal(),
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        use_vmap=use_vmap,
        **kwargs,
    )


def _causal():
    from transformers.masking_utils import causal_mask_function

    return causal_mask_function


# ------------------------------------------------------------------------------------------------
# Attention function (AttentionInterface)
# ------------------------------------------------------------------------------------------------


def _check_dropout(dropout):
    if dropout is not None and float(dropout) != 0.0:
        raise ValueError(
            f"attnkit attention has no dropout: dropout must be 0, got {dropout} "
            "(call model.eval() or set the config's attention_dropout to 0)"
        )


def _plain(q, k, v, *, causal, scale, keys):
    if keys is None:
        return attnkit.sparse_query_attention(q, k, v, causal=causal, scale=scale)
    return attnkit.masked_bias_attention(q, k, v, attn_mask=keys[:, None, None, :], causal=causal, scale=scale)


def _windowed(q, k, v, *, window, scale, keys):
    """Causal sliding-window attention (bottom-right aligned): key j is seen by row i iff
    0 <= (i + Lk - Lq) - j < window. Chunks of query rows, each on the key slice it can reach."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    shift = Lk - Lq
    if window >= Lk:  # no row can reach past the window
        return _plain(q, k, v, causal=True, scale=scale, keys=keys)
    chunk = max(1, min(WINDOW_CHUNK, window))
    outs = []
    for i0 in range(0, Lq, chunk):
        i1 = min(Lq, i0 + chunk)
        k1 = i1 + shift  # keys after k1 - 1 are in the future of every row of the chunk
        k0 = max(0, i0 + shift - window + 1)  # keys before k0 are out of every row's window
        if k1 <= k0:
            outs.append(q.new_zeros(B, i1 - i0, max(H, k.shape[2]), D))
            continue
        qs, ks, vs = q[:, i0:i1], k[:, k0:k1], v[:, k0:k1]
        first = torch.arange(i0, i1, device=q.device) + (shift - window + 1)  # first key each row sees
        inside = torch.arange(k0, k1, device=q.device)[None, :] >= first[:, None]  # [rows, keys]
        mask = None if bool(inside.all()) else inside[None, None]
        if keys is not None:
            kp = keys[:, None, None, k0:k1]
            mask = kp if mask is None else (mask & kp)
        if mask is None:
            o = attnkit.sparse_query_attention(qs, ks, vs, causal=True, scale=scale)
        else:
            o = attnkit.masked_bias_attention(qs, ks, vs, attn_mask=mask, causal=True, scale=scale)
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _dense(q, k, v, mask, *, scale):
    Lk = k.shape[1]
    if mask.shape[-1] < Lk:
        raise ValueError(f"attention_mask has {mask.shape[-1]} key columns, fewer than the {Lk} keys")
    mask = mask[..., :Lk]
    if mask.dtype == torch.bool:
        return attnkit.masked_bias_attention(q, k, v, attn_mask=mask, causal=False, scale=scale)
    if mask.is_floating_point():
        return attnkit.masked_bias_attention(q, k, v, attn_bias=mask, causal=False, scale=scale)
    raise TypeError(f"attention_mask must be a bool or floating-point tensor, got {mask.dtype}")


def attnkit_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    is_causal=None,
    sliding_window=None,
    softcap=None,
    **kwargs,
):
    """transformers attention function running on attnkit (registered as ``"attnkit"``).

    query ``[B, Hq, Lq, D]``, key / value ``[B, Hkv, Lk, D]`` (GQA as given, no ``repeat_kv``).
    Returns ``(out [B, Lq, Hq, D], None)``. See the module docstring for the masks it accepts.
    """
    _check_dropout(dropout)
    if softcap is not None:
        raise ValueError("attnkit attention does not support softcap; use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("attnkit attention does not support attention sinks; use attn_implementation='eager'")
    if kwargs.get("output_attentions", False):
        logger.warning("attnkit attention does not return attention weights (output_attentions=True)")
    if key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1]:
        raise ValueError(
            "attnkit attention needs one head dim for query, key and value, got "
            f"{query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]}"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scale = None if scaling is None else float(scaling)

    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask of type {type(attention_mask).__name__} is not supported by attnkit attention "
            "(a flex BlockMask comes from attn_implementation='flex_attention')"
        )
    if attention_mask is not None and attention_mask.dim() == 4:
        return _dense(q, k, v, attention_mask, scale=scale), None

    keys = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be None, 2-D [B, Lk] or 4-D, got {attention_mask.dim()} dims")
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"a 2-D attention_mask must be a bool key mask, got {attention_mask.dtype}")
        if tuple(attention_mask.shape) != (q.shape[0], k.shape[1]):
            raise ValueError(
                f"a 2-D attention_mask must have shape [B, Lk] = [{q.shape[0]}, {k.shape[1]}], "
                f"got {list(attention_mask.shape)}"
            )
        keys = attention_mask
    if sliding_window is not None:
        if not causal:
            raise ValueError("attnkit attention supports sliding_window with causal attention only")
        window = int(sliding_window)
        if window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        return _windowed(q, k, v, window=window, scale=scale, keys=keys), None
    return _plain(q, k, v, causal=causal, scale=scale, keys=keys), None


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register attnkit's attention function and mask builder with transformers under ``name``.

    Idempotent; returns ``name``. Afterwards ``attn_implementation=name`` selects attnkit.
    """
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attnkit_attention_forward)
    AttentionMaskInterface.register(name, attnkit_mask)
    return name


# ------------------------------------------------------------------------------------------------
# patch(): Doge -> dynamic_mask_attention, MiniMax lightning layers -> lightning_attention
# ------------------------------------------------------------------------------------------------


def _modeling(module):
    return sys.modules[type(module).__module__]


def _doge_forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
    """DogeAttention.forward with the dense top-k mask + dense attention replaced by
    ``attnkit.dynamic_mask_attention`` (same projections, norms, rotary embedding, cache, bias)."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    _check_dropout(self.attention_dropout if self.training else 0.0)
    modeling = _modeling(self)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = modeling.apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

    # the value-derived gate of dynamic mask attention, one score per key and KV head: [B, Hkv, Lk]
    dt_states = self.dt_proj(value_states.transpose(1, 2).reshape(value_states.shape[0], value_states.shape[-2], -1))
    dt_states = torch.exp(self.A * F.softplus(dt_states)).transpose(-1, -2)

    q, k, v = query_states.transpose(1, 2), key_states.transpose(1, 2), value_states.transpose(1, 2)
    if attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        window = getattr(self.config, "sliding_window", None)
        if window is not None and k.shape[1] > window:
            raise ValueError(
                "a compact mask reached a patched DogeAttention with sliding_window set; "
                "dynamic_mask_attention has no window (patch() keeps such models on dense masks)"
            )
        bias = dt_states.float()
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (k.shape[0], k.shape[1]):
                raise ValueError(
                    f"a 2-D attention_mask must have shape [B, Lk] = [{k.shape[0]}, {k.shape[1]}], "
                    f"got {list(attention_mask.shape)}"
                )
            # padding keys take the dtype's lowest value, as in DogeAttention.prepare_dynamic_mask:
            # they lose every selection to a real key and get no weight beside one
            bias = bias.masked_fill(~attention_mask.to(torch.bool)[:, None, :], torch.finfo(torch.float32).min)
        out = attnkit.dynamic_mask_attention(q, k, v, bias, keep=int(self.keep_window_size), causal=True,
                                             scale=self.scaling)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        # any other mask (sliding window, static cache, custom): Doge's own dense additive mask, exactly
        attn_bias = self.prepare_dynamic_mask(
            hidden_states=hidden_states,
            dt_states=dt_states,
            keep_window_size=self.keep_window_size,
            attention_mask=attention_mask,
        )
        out = attnkit.masked_bias_attention(q, k, v, attn_bias=attn_bias, causal=False, scale=self.scaling)
    else:
        raise TypeError(f"patched DogeAttention cannot use an attention_mask of type {type(attention_mask).__name__}")

    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), None


def _minimax_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """MiniMaxLightningAttention.forward with the block-wise core (and the per-token decode loop)
    replaced by ``attnkit.lightning_attention`` / ``lightning_attention_decode``. Activation, padding
    zeroing, RMS norm, output gate and projections are MiniMax's own; the state in the cache is the
    float32 ``[B, H, D, D]`` sum of k^T v, as in MiniMaxCache's linear cache."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    modeling = _modeling(self)
    B, L, _ = hidden_states.shape
    H, D = self.num_attention_heads, self.head_dim

    qkv = self.act_fn(self.qkv_proj(hidden_states))
    qkv = modeling.apply_mask_to_padding_states(qkv, attention_mask)
    qkv = qkv.reshape(B, L, H, 3 * D)
    q, k, v = torch.split(qkv, D, dim=3)  # [B, L, H, D]: attnkit's layout already

    state = cache.get_linear_cache(self.layer_idx) if cache is not None else None
    if not isinstance(state, torch.Tensor):
        state = None
    slopes = self.slope_rate.reshape(-1)
    if state is not None and L == 1:
        out, final_state = attnkit.lightning_attention_decode(q, k, v, state, slopes, scale=1.0, inplace=False)
    else:
        out, final_state = attnkit.lightning_attention(
            q, k, v, slopes, scale=1.0, initial_state=state, output_final_state=True
        )

    out = out.reshape(B, L, H * D)
    out = self.norm(out)
    out = torch.sigmoid(self.output_gate(hidden_states)) * out
    out = self.out_proj(out)
    if cache is not None:
        cache.set_linear_cache(self.layer_idx, final_state)
    return out, final_state


def _patch_classes():
    classes = []
    try:
        from transformers.models.doge.modeling_doge import DogeAttention

        classes.append((DogeAttention, "doge", _doge_forward))
    except ImportError:  # pragma: no cover - depends on the transformers build
        pass
    try:
        from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

        classes.append((MiniMaxLightningAttention, "minimax", _minimax_forward))
    except ImportError:  # pragma: no cover
        pass
    return classes


def _use_attnkit_masks(model):
    """Switch a model's mask building (and any unpatched attention layer) to ``"attnkit"``."""
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except Exception:  # older set-ups: set it on the configs directly
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = ATTN_IMPLEMENTATION


def patch(model):
    """Replace, in place, the attention of the layers attnkit implements; returns ``model``.

    - ``DogeAttention`` runs on :func:`attnkit.dynamic_mask_attention`: the bias is Doge's
      ``dt_states`` (``exp(A * softplus(dt_proj(v)))``), ``keep`` its ``keep_window_size`` (every
      visible key kept when there are at most ``keep``, else the ``keep`` with the largest bias; ties
      go to the lower key index, where ``torch.topk`` leaves them unspecified), scale ``head_dim**-0.5``,
      bottom-right causal so cache decode steps are right; padding keys get the lowest float, as in
      Doge's own mask. The model is switched to ``attn_implementation="attnkit"`` so that its masks
      are compact (no ``[L, L]`` mask) unless the config has a ``sliding_window``, in which case the
      layers fall back to Doge's own dense mask applied with ``masked_bias_attention``.
    - ``MiniMaxLightningAttention`` runs its core on :func:`attnkit.lightning_attention` (prefill, and
      continuation from the cached state) and :func:`attnkit.lightning_attention_decode` (one-token
      steps), with the layer's own ``slope_rate`` buffer; MiniMax's full-attention layers are left alone.

    Only the ``forward`` of each matching module is replaced (an instance attribute); parameters,
    buffers and the state dict do not change. Patching twice is harmless. Sets and returns the list
    of patched module names in ``model._attnkit_patched``; no dropout in patched layers while training.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _require_transformers()
    register()
    patched = []
    doge_configs = []
    classes = _patch_classes()
    for name, module in model.named_modules():
        for cls, family, fwd in classes:
            if isinstance(module, cls):
                if getattr(module, "_attnkit_patched_family", None) != family:
                    module.forward = types.MethodType(fwd, module)
                    module._attnkit_patched_family = family
                patched.append(name)
                if family == "doge":
                    doge_configs.append(module.config)
    if doge_configs:
        _use_attnkit_masks(model)
        for cfg in doge_configs:
            if getattr(cfg, "sliding_window", None) is None:
                _COMPACT_CONFIGS[id(cfg)] = cfg
        for m in model.modules():  # the model-level configs the mask builder sees
            cfg = getattr(m, "config", None)
            is_doge = cfg is not None and getattr(cfg, "model_type", None) == "doge"
            if is_doge and getattr(cfg, "sliding_window", None) is None:
                _COMPACT_CONFIGS[id(cfg)] = cfg
    model._attnkit_patched = patched
    if patched:
        logger.info("attnkit patched %d attention layers: %s", len(patched), ", ".join(patched))
    return model
