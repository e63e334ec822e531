"""attnkit inside Hugging Face transformers models (tiny random-weight models built from configs, fp32, CPU).

References: the same model on transformers' eager attention. Logits and gradients follow the
FlashAttention rule against the model run in float64 with eager attention; generated tokens must be
identical to the eager model's.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip("the integration targets transformers 5.x", allow_module_level=True)

from attnkit.integrations import transformers as akt  # noqa: E402
from conftest import assert_close_fa, one_thread  # noqa: E402

VOCAB = 97
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _single_thread():
    # tiny models: many small ops, which a busy machine runs faster on one thread
    with one_thread():
        yield


def _left_padded(B=2, L=12, pad=(4, 0), seed=1):
    """Distinct token ids per row (no repeated value vectors, hence no exact bias ties in Doge's first
    layer, where torch.topk and attnkit break ties differently), left padding of ``pad[b]`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(VOCAB - 1, generator=g)[:L] + 1 for _ in range(B)])
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


def _eager(model_cls, cfg, seed=0):
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def _attnkit(model):
    m = copy.deepcopy(model)
    m.set_attn_implementation(akt.register())
    return m


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with the softmax in the inputs' dtype (transformers' eager runs it in float32,
    which turns the float64 mask minimum into -inf and fully padded rows into NaN)."""
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    s = (query @ k.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        s = s + attention_mask[..., : k.shape[-2]]
    return (torch.softmax(s, -1) @ v).transpose(1, 2).contiguous(), None


@pytest.fixture(autouse=True)
def _reference_implementation(monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    monkeypatch.setitem(AttentionInterface._global_mapping, "reference64", _reference_attention)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "reference64", eager_mask)


def _f64(model):
    """The float64 reference: the model in float64 with eager attention computed in float64."""
    m = copy.deepcopy(model).double()
    m.set_attn_implementation("reference64")
    return m


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      pad_token_id=0, attention_dropout=0.0)
    return LlamaForCausalLM, cfg


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # one full and one sliding layer (hybrid cache), window smaller than the sequence
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0,
                      use_sliding_window=True, sliding_window=5, max_window_layers=1)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    return Qwen2ForCausalLM, cfg


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                        pad_token_id=0, sliding_window=5)
    return MistralForCausalLM, cfg


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral}


def _record_masks(monkeypatch):
    """Record the masks the attnkit mask builder hands to the model."""
    from transformers.masking_utils import AttentionMaskInterface

    seen = []

    def recording(*args, **kwargs):
        out = akt.attnkit_mask(*args, **kwargs)
        seen.append(None if out is None else tuple(out.shape))
        return out

    akt.register()
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "attnkit", recording)
    return seen


# ------------------------------------------------------------------------------------------------
# "attnkit" attention implementation: Llama, Qwen2 (hybrid sliding), Mistral (sliding window)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_left_padded_match_eager(family, monkeypatch):
    model_cls, cfg = FAMILIES[family]()
    eager = _eager(model_cls, cfg)
    ours = _attnkit(eager)
    ref = _f64(eager)
    seen = _record_masks(monkeypatch)
    ids, mask = _left_padded(L=12, pad=(4, 0))
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask).logits
        e32 = eager(input_ids=ids, attention_mask=mask).logits
        r64 = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.isfinite(out).all()
    assert_close_fa(out[valid], r64[valid], e32[valid], ATOL, f"{family} logits")
    # plain causal / sliding masks with padding travel as [B, Lk] key masks, never as [L, L]
    assert seen and all(s == (2, 12) for s in seen), seen


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_step_gradients_match_eager(family):
    model_cls, cfg = FAMILIES[family]()
    eager = _eager(model_cls, cfg).train()
    ours = _attnkit(eager).train()
    ref = _f64(eager).train()
    ids, mask = _left_padded(L=12, pad=(3, 0), seed=2)
    # no loss on padding, nor on the first real token (predicted from a padded position, whose output
    # is implementation-defined: eager averages over every key, attnkit gives 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    grads = []
    for m in (ours, eager, ref):
        m.zero_grad()
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    g_ours, g_eager, g_ref = grads
    assert set(g_ours) == set(g_ref) and len(g_ours) > 10
    for n in g_ref:
        assert_close_fa(g_ours[n], g_ref[n], g_eager[n], ATOL, f"{family} grad {n}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_matches_eager(family):
    model_cls, cfg = FAMILIES[family]()
    eager = _eager(model_cls, cfg)
    ours = _attnkit(eager)
    ids, mask = _left_padded(L=10, pad=(3, 0), seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    a = eager.generate(ids, **kw)
    b = ours.generate(ids, **kw)
    assert a.shape == (2, 18)
    assert torch.equal(a, b), (a[:, 10:].tolist(), b[:, 10:].tolist())


def test_right_padding_and_decode_steps_match_eager():
    model_cls, cfg = _mistral()
    eager = _eager(model_cls, cfg)
    ours = _attnkit(eager)
    ref = _f64(eager)
    ids, _ = _left_padded(L=12, pad=(0, 0), seed=4)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    with torch.no_grad():
        outs = [m(input_ids=ids, attention_mask=mask).logits for m in (ours, eager, ref)]
    valid = mask.bool()
    assert_close_fa(outs[0][valid], outs[2][valid], outs[1][valid], ATOL, "right-padded logits")
    # prefill 9 tokens, then 3 one-token steps through the (sliding) cache: Lq = 1 < Lk
    from transformers import DynamicCache

    ids = ids[:1]
    res = []
    for m in (ours, eager, ref):
        cache = DynamicCache(config=m.config)
        steps = [m(input_ids=ids[:, :9], cache=cache, use_cache=True).logits[:, -1]]
        for t in range(9, 12):
            steps.append(m(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
        res.append(torch.stack(steps))
    assert_close_fa(res[0], res[2], res[1], ATOL, "cached decode logits")


# ------------------------------------------------------------------------------------------------
# The attention function itself
# ------------------------------------------------------------------------------------------------


class _Module(torch.nn.Module):
    is_causal = True


def _qkv(B=2, Hq=4, Hkv=2, Lq=7, Lk=7, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g),
            torch.randn(B, Hkv, Lk, D, generator=g))


def _dense_ref(q, k, v, scale, allowed=None, bias=None):
    """softmax(scale q.k + bias) over the allowed keys, rows with none -> 0; out [B, Lq, H, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def _check_fn(out, q, k, v, scale, name, allowed=None, bias=None):
    """FlashAttention rule: the float64 dense reference, and the same dense math in float32."""
    ref = _dense_ref(q.double(), k.double(), v.double(), scale, allowed, None if bias is None else bias.double())
    eager = _dense_ref(q, k, v, scale, allowed, bias)
    assert_close_fa(out, ref, eager, 1e-6, name)


@pytest.mark.parametrize("window", [None, 1, 3, 100])
@pytest.mark.parametrize("lq", [7, 1, 3])
def test_attention_function_key_mask_window_decode(window, lq, monkeypatch):
    monkeypatch.setattr(akt, "WINDOW_CHUNK", 2)  # several chunks even at these sizes
    Lk = 9
    q, k, v = _qkv(Lq=lq, Lk=Lk)
    keys = torch.ones(2, Lk, dtype=torch.bool)
    keys[0, :5] = False  # left padding: with lq=7 rows 0..2 of batch 0 see no key
    keys[1, -1] = False
    i = torch.arange(lq)[:, None] + (Lk - lq)
    j = torch.arange(Lk)[None, :]
    visible = ((j <= i) & (True if window is None else (i - j < window)))[None, None]
    allowed = visible & keys[:, None, None, :]
    out, w = akt.attnkit_attention_forward(_Module(), q, k, v, keys, scaling=0.3, sliding_window=window)
    assert w is None
    assert out.shape == (2, lq, 4, 16)
    _check_fn(out, q, k, v, 0.3, f"key mask, window {window}", allowed=allowed)
    if lq == 7:
        assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))  # rows that see no key give 0
    # without padding: the window alone (and no mask at all when there is no window)
    out, _ = akt.attnkit_attention_forward(_Module(), q, k, v, None, scaling=0.3, sliding_window=window)
    _check_fn(out, q, k, v, 0.3, f"window {window}", allowed=visible)


def test_attention_function_dense_masks_and_errors():
    q, k, v = _qkv(Lq=5, Lk=8)
    g = torch.Generator().manual_seed(5)
    allowed = torch.rand(2, 1, 5, 8, generator=g) > 0.4
    allowed[:, :, :, 0] = True
    # 4-D bool: applied as given (no causal on top), with extra key columns sliced off (static caches)
    wide = torch.cat([allowed, torch.ones(2, 1, 5, 3, dtype=torch.bool)], -1)
    out, _ = akt.attnkit_attention_forward(_Module(), q, k, v, wide, scaling=0.25)
    _check_fn(out, q, k, v, 0.25, "4-D bool mask", allowed=allowed)
    # 4-D float: additive, as in eager attention
    bias = torch.randn(2, 1, 5, 8, generator=g)
    out, _ = akt.attnkit_attention_forward(_Module(), q, k, v, bias, scaling=0.25)
    _check_fn(out, q, k, v, 0.25, "4-D float mask", bias=bias)
    # no mask: bottom-right causal (a chunk of 5 queries after 3 cached keys)
    out, _ = akt.attnkit_attention_forward(_Module(), q, k, v, None)
    causal = (torch.arange(8)[None] <= torch.arange(5)[:, None] + 3)[None, None]
    _check_fn(out, q, k, v, 16 ** -0.5, "causal", allowed=causal)
    with pytest.raises(ValueError, match="dropout"):
        akt.attnkit_attention_forward(_Module(), q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="softcap"):
        akt.attnkit_attention_forward(_Module(), q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match=r"\[B, Lk\]"):
        akt.attnkit_attention_forward(_Module(), q, k, v, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool key mask"):
        akt.attnkit_attention_forward(_Module(), q, k, v, torch.ones(2, 8))
    with pytest.raises(TypeError, match="attention_mask of type"):
        akt.attnkit_attention_forward(_Module(), q, k, v, [[1]])
    with pytest.raises(ValueError, match="fewer than"):
        akt.attnkit_attention_forward(_Module(), q, k, v, allowed[..., :6])


def test_mask_builder_falls_back_to_dense_for_other_masks():
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask, sdpa_mask

    akt.register()
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    cfg._attn_implementation = "attnkit"
    emb = torch.zeros(1, 8, 64)
    # packed sequences (positions restart): transformers' dense bool mask, applied exactly
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    m = create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=None, position_ids=pos)
    cfg._attn_implementation = "sdpa"
    expect = create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=None, position_ids=pos)
    assert m.shape == (1, 1, 8, 8) and torch.equal(m, expect)
    # plain causal without padding: no mask at all; asked to materialise: dense
    assert akt.attnkit_mask(batch_size=1, q_length=8, kv_length=8) is None
    dense = akt.attnkit_mask(batch_size=1, q_length=8, kv_length=8, allow_is_causal_skip=False)
    assert torch.equal(dense, sdpa_mask(batch_size=1, q_length=8, kv_length=8, allow_is_causal_skip=False))
    # a static cache (keys beyond the queries): dense as well
    assert akt.attnkit_mask(batch_size=1, q_length=2, kv_length=16, q_offset=3).shape == (1, 1, 2, 16)


def test_register_is_idempotent_and_import_is_lazy():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert akt.register() == "attnkit" and akt.register() == "attnkit"
    assert AttentionInterface._global_mapping["attnkit"] is akt.attnkit_attention_forward
    assert AttentionMaskInterface._global_mapping["attnkit"] is akt.attnkit_mask
    import subprocess

    code = "import sys, attnkit, attnkit.integrations, attnkit.bench; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


# ------------------------------------------------------------------------------------------------
# patch(): Doge (dynamic mask attention) and MiniMax (lightning attention)
# ------------------------------------------------------------------------------------------------


def _doge(keep=6, seed=0):
    from transformers import DogeConfig, DogeForCausalLM

    cfg = DogeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, keep_window_size=keep,
                     max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False)
    model = _eager(DogeForCausalLM, cfg, seed)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():  # a non-constant bias: A = 0 (the initialisation) makes every dt_states 1
        for layer in model.model.layers:
            layer.self_attn.A.copy_(torch.randn(layer.self_attn.A.shape, generator=g) * 2)
    return model


def test_doge_patch_logits_and_generation(monkeypatch):
    eager = _doge(keep=6)
    state = {k: v.clone() for k, v in eager.state_dict().items()}
    ours = akt.patch(copy.deepcopy(eager))
    assert ours._attnkit_patched == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert state.keys() == ours.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    ref = _f64(eager)
    seen = _record_masks(monkeypatch)
    ids, mask = _left_padded(L=14, pad=(4, 0), seed=6)
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask).logits
        e32 = eager(input_ids=ids, attention_mask=mask).logits
        r64 = ref(input_ids=ids, attention_mask=mask).logits
        # the selection matters here: keeping every key changes the model's output
        everything = _f64(_doge(keep=64))(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.isfinite(out).all()
    assert (everything - r64)[valid].abs().max() > 1e-3
    assert_close_fa(out[valid], r64[valid], e32[valid], ATOL, "doge logits")
    assert seen == [(2, 14)]  # a [B, Lk] key mask instead of Doge's dense [B, 1, L, L] one
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    a = eager.generate(ids, **kw)
    b = ours.generate(ids, **kw)
    assert torch.equal(a, b), (a[:, 14:].tolist(), b[:, 14:].tolist())
    assert akt.patch(ours)._attnkit_patched == ours._attnkit_patched  # idempotent


def test_doge_patch_dense_mask_fallback():
    # on sdpa's dense bool masks (e.g. a user switching back), the patched layers stay exact
    eager = _doge(keep=5, seed=1)
    ours = akt.patch(copy.deepcopy(eager))
    ours.set_attn_implementation("sdpa")
    ids, mask = _left_padded(L=10, pad=(2, 0), seed=7)
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask).logits
        e32 = eager(input_ids=ids, attention_mask=mask).logits
        r64 = _f64(eager)(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert_close_fa(out[valid], r64[valid], e32[valid], ATOL, "doge logits, dense mask")


def test_doge_patch_sliding_window_uses_dense_fallback(monkeypatch):
    # dynamic_mask_attention has no window: a sliding-window Doge keeps its own dense mask, exactly
    from transformers import DogeConfig, DogeForCausalLM

    cfg = DogeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, keep_window_size=4, sliding_window=6,
                     max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False)
    eager = _eager(DogeForCausalLM, cfg)
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.A.copy_(torch.randn(layer.self_attn.A.shape, generator=torch.Generator().manual_seed(3)))
    ours = akt.patch(copy.deepcopy(eager))
    seen = _record_masks(monkeypatch)
    ids, mask = _left_padded(L=14, pad=(3, 0), seed=6)
    with torch.no_grad():
        outs = [m(input_ids=ids, attention_mask=mask).logits for m in (ours, eager, _f64(eager))]
    valid = mask.bool()
    assert_close_fa(outs[0][valid], outs[2][valid], outs[1][valid], ATOL, "sliding doge logits")
    assert seen == [(2, 1, 14, 14)]
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(eager.generate(ids, **kw), ours.generate(ids, **kw))


@pytest.mark.parametrize("family", ["doge", "minimax"])
def test_patched_training_step_gradients_match_eager(family):
    eager = _doge(keep=6) if family == "doge" else _minimax()
    ours = akt.patch(copy.deepcopy(eager)).train()
    ref = _f64(eager).train()
    eager.train()
    ids, mask = _left_padded(L=12, pad=(3, 0), seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # as in test_training_step_gradients_match_eager
    grads = []
    for m in (ours, eager, ref):
        m.zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    g_ours, g_eager, g_ref = grads
    assert set(g_ours) == set(g_ref) and len(g_ref) > 10
    if family == "doge":
        assert "model.layers.0.self_attn.A" in g_ref  # the bias' parameter is trained through the op
    for n in g_ref:
        assert_close_fa(g_ours[n], g_ref[n], g_eager[n], ATOL, f"{family} grad {n}")


def _minimax(seed=0, layer_types=("linear_attention", "full_attention")):
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    cfg = MiniMaxConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        layer_types=list(layer_types), block_size=8, num_local_experts=2,
                        num_experts_per_tok=1, max_position_embeddings=128, pad_token_id=0)
    cfg._experts_implementation = "eager"  # the grouped-mm experts have no float64 (the reference)
    return _eager(MiniMaxForCausalLM, cfg, seed)


def test_minimax_patch_logits_and_generation():
    eager = _minimax()
    ours = akt.patch(copy.deepcopy(eager))
    assert ours._attnkit_patched == ["model.layers.0.self_attn"]  # the full-attention layer is left alone
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), ours.state_dict().values()))
    ref = _f64(eager)
    ids, mask = _left_padded(L=20, pad=(5, 0), seed=8)  # several of MiniMax's 8-row blocks
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask).logits
        e32 = eager(input_ids=ids, attention_mask=mask).logits
        r64 = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert_close_fa(out[valid], r64[valid], e32[valid], ATOL, "minimax logits")
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    a = eager.generate(ids, **kw)
    b = ours.generate(ids, **kw)
    assert torch.equal(a, b), (a[:, 20:].tolist(), b[:, 20:].tolist())


def test_minimax_patch_cache_continuation_and_state():
    # a multi-token chunk after a cached prefill runs from the cached state (initial_state). Lightning
    # layers only: MiniMax sizes the full layers' mask of such a chunk from the linear layer's cache
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    eager = _minimax(seed=1, layer_types=("linear_attention", "linear_attention"))
    ours = akt.patch(copy.deepcopy(eager))
    ref = _f64(eager)
    ids, _ = _left_padded(B=1, L=15, pad=(0,), seed=9)
    res, states = [], []
    for m in (ours, eager, ref):
        cache = MiniMaxCache()
        with torch.no_grad():
            a = m(input_ids=ids[:, :9], cache=cache, use_cache=True).logits
            b = m(input_ids=ids[:, 9:13], cache=cache, use_cache=True).logits
            c = m(input_ids=ids[:, 13:14], cache=cache, use_cache=True).logits
        res.append(torch.cat([a, b, c], 1))
        states.append(torch.stack([cache.get_linear_cache(0), cache.get_linear_cache(1)]))
    assert_close_fa(res[0], res[2], res[1], ATOL, "minimax chunked logits")
    assert_close_fa(states[0], states[2], states[1], ATOL, "minimax linear cache")


def test_patch_rejects_non_modules_and_leaves_others_alone():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        akt.patch("llama")
    model_cls, cfg = _llama()
    m = akt.patch(_eager(model_cls, cfg))
    assert m._attnkit_patched == [] and m.config._attn_implementation == "eager"


# ------------------------------------------------------------------------------------------------
# the end-to-end bench cases (registry op "models"): the gate passes at a tiny size
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "doge", "minimax"])
def test_bench_model_case_gate_passes(family):
    from attnkit.bench import cases as C
    from attnkit.bench.cases import models as CM
    from attnkit.bench.runner import Runner
    from attnkit.bench.timing import TimingPolicy

    assert "models" in C.REGISTRY
    shape = dict(CM.model_shape(family, gpu=False), hidden=64, ffn=96, head_dim=16, vocab=97, keep=8)
    case = CM.model_case(family, B=1, L=24, dtype=torch.float32, device="cpu", mode="fwd+bwd", shape=shape)
    policy = TimingPolicy(warmup=1, min_reps=1, max_reps=1, target_s=0.001, flush_l2=False)
    res = Runner("cpu", policy).run_case(case)
    assert res.gate["status"] == "PASS", res.gate
    assert res.gate["reference"] == "transformers-default"
    assert set(res.gate["detail"]) == {"output", "dinputs_embeds"}
    assert res.op_result.ms > 0 and res.flops > 0


# ------------------------------------------------------------------------------------------------
# CUDA (bf16; the CUDA kernels take head dims 32..256)
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "mistral", "minimax"])
def test_cuda_bf16_logits_left_padded(family):
    if family == "minimax":
        eager = _minimax(seed=2)
    else:
        model_cls, cfg = FAMILIES[family]()
        cfg.head_dim = 32
        eager = _eager(model_cls, cfg, seed=2)
    ref = _f64(eager)  # float64 on the CPU
    eager = eager.to("cuda", torch.bfloat16)
    ours = akt.patch(copy.deepcopy(eager)) if family == "minimax" else _attnkit(eager)
    ids, mask = _left_padded(L=40, pad=(7, 0), seed=11)
    with torch.no_grad():
        out = ours(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
        e16 = eager(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
        r64 = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert_close_fa(out[valid], r64[valid], e16[valid], 2e-2, f"{family} bf16 logits")


def test_minimax_all_attnkit_cached_decode_with_padding():
    # MiniMax sizes its full layers' mask from its first (linear) cache layer, which holds no keys; on
    # "attnkit" the decode steps still exclude the padding: they match full forwards without a cache
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    eager = _minimax(seed=3)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(akt.register())
    akt.patch(ours)
    ids, mask = _left_padded(L=14, pad=(4, 0), seed=12)
    cache = MiniMaxCache()
    with torch.no_grad():
        ours(input_ids=ids[:, :11], attention_mask=mask[:, :11], cache=cache, use_cache=True)
        # explicit positions: MiniMax counts the cache's length on its first (linear) layer, which is 0
        steps = [ours(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=torch.tensor([[t]]),
                      cache=cache, use_cache=True).logits for t in range(11, 14)]
        out = torch.cat(steps, 1)
        e32 = eager(input_ids=ids, attention_mask=mask).logits[:, 11:]
        r64 = _f64(eager)(input_ids=ids, attention_mask=mask).logits[:, 11:]
    assert_close_fa(out, r64, e32, ATOL, "minimax cached decode, attnkit everywhere")
