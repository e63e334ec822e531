"""End-to-end cases: small Llama-, Doge- and MiniMax-shaped transformers models, attnkit vs the
models' default attention (transformers' ``sdpa``; for Doge its dense top-k mask, for MiniMax its
block-wise PyTorch lightning attention).

Two ways to run them:

- the registry op ``models`` (``python -m attnkit.bench --ops models``): one case per family, length
  and mode. ``fwd`` is a prefill (forward over the prompt, filling the cache, no grad); ``fwd+bwd`` a
  forward + backward to the input embeddings (the weight gradients are left out: they do not depend
  on the attention). The gate compares the logits (and the embeddings' gradient) with the default
  model run in float32 (the ``reference-fp32`` oracle) when the case is in half precision.
- :func:`run_models` / ``python -m attnkit.bench.e2e``: tokens/s and peak memory of a prefill
  and of a full training step (forward with labels, ``loss.backward()`` with every weight gradient).

transformers (5.x) is imported only when a case is built; without it the op has no cases.
"""

from __future__ import annotations

import argparse
import copy

import torch

from . import Case, Impl, SuiteConfig, _gen, causal_pairs, kept_pairs, register, seqlens
from ..timing import TimingPolicy, measure, peak_memory_bytes

FAMILIES = ("llama", "doge", "minimax")
_HALF = (torch.float16, torch.bfloat16)


def transformers_available() -> str | None:
    """None when transformers 5.x can be imported, else the reason."""
    try:
        import transformers
    except ImportError:
        return "transformers is not installed (pip install 'transformers>=5,<6')"
    if int(transformers.__version__.split(".")[0]) != 5:
        return f"needs transformers 5.x, found {transformers.__version__}"
    return None


def model_shape(family: str, gpu: bool) -> dict:
    """The model sizes: a ~100M-parameter model with head dim 64 on GPU, a tiny one on CPU."""
    if gpu:
        s = dict(vocab=8192, hidden=1024, layers=4, heads=16, kv_heads=4, head_dim=64, ffn=2816, keep=2048)
    else:
        s = dict(vocab=512, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, ffn=256, keep=64)
    s["family"] = family
    return s


def build_model(family: str, shape: dict, *, dtype, device, seed: int = 0):
    """A random-weight model of ``family`` with the default attention, in eval mode."""
    import transformers as tf

    common = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                  num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                  num_key_value_heads=shape["kv_heads"], max_position_embeddings=1 << 17, pad_token_id=0)
    if family == "llama":
        cls, cfg = tf.LlamaForCausalLM, tf.LlamaConfig(head_dim=shape["head_dim"], **common)
    elif family == "doge":
        # Doge's head dim is hidden / heads; keep_window_size below the longer lengths makes it sparse
        cls, cfg = tf.DogeForCausalLM, tf.DogeConfig(keep_window_size=shape["keep"], tie_word_embeddings=False,
                                                     **common)
    elif family == "minimax":
        layer_types = ["linear_attention", "full_attention"] * (shape["layers"] // 2)
        cls, cfg = tf.MiniMaxForCausalLM, tf.MiniMaxConfig(
            head_dim=shape["head_dim"], layer_types=layer_types, num_local_experts=4, num_experts_per_tok=2,
            **common)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    model = cls(cfg)
    if family == "doge":  # A = 0 (the initialisation) makes the bias constant; a trained model's is not
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.A.copy_(torch.randn(layer.self_attn.A.shape, generator=g))
    return model.to(device=device, dtype=dtype).eval()


def attnkit_model(model):
    """A copy of ``model`` on attnkit: the ``"attnkit"`` attention implementation everywhere, plus
    ``patch`` for Doge's and MiniMax's own attention layers."""
    from attnkit.integrations import transformers as akt

    m = copy.deepcopy(model)
    m.set_attn_implementation(akt.register())
    return akt.patch(m)


def _token_ids(B, L, vocab, seed, device):
    """Distinct ids within a row where the vocabulary allows it (no exact ties in Doge's first-layer bias)."""
    g = _gen(seed)
    if L < vocab:
        rows = [torch.randperm(vocab - 1, generator=g)[:L] + 1 for _ in range(B)]
        return torch.stack(rows).to(device)
    return torch.randint(1, vocab, (B, L), generator=g).to(device)


def forward_flops(shape: dict, B: int, L: int) -> float:
    """Approximate forward FLOPs: 2 x (projection and MLP weights) per token, plus the attention."""
    h, hd, H, Hkv, f, layers = shape["hidden"], shape["head_dim"], shape["heads"], shape["kv_heads"], shape["ffn"], \
        shape["layers"]
    fam = shape["family"]
    proj = h * hd * (2 * H + 2 * Hkv)
    if fam == "minimax":
        mlp = 2 * 3 * h * f  # two experts per token
        lin_proj = h * H * hd * 5  # qkv, output gate, out
        per_layer = [lin_proj if i % 2 == 0 else proj for i in range(layers)]
    else:
        mlp = 3 * h * f
        per_layer = [proj] * layers
    total = sum(2.0 * (p + mlp) * B * L for p in per_layer) + 2.0 * h * shape["vocab"] * B * L
    for i in range(layers):
        if fam == "minimax" and i % 2 == 0:
            total += B * H * L * (64 * 2 * hd + 4.0 * hd * hd)  # chunked linear attention
        elif fam == "doge":
            total += 4.0 * B * H * hd * kept_pairs(L, L, shape["keep"], True)
        else:
            total += 4.0 * B * H * hd * causal_pairs(L, L, True)
    return total


def model_case(family: str, *, B: int, L: int, dtype, device: str, mode: str, shape: dict | None = None) -> Case:
    """One end-to-end case (see the module docstring for what ``fwd`` and ``fwd+bwd`` time)."""
    shape = shape or model_shape(family, device == "cuda")
    state: dict = {}

    def models():
        if "default" not in state:
            base = build_model(family, shape, dtype=dtype, device=device)
            state["default"] = base
            state["attnkit"] = attnkit_model(base)
        return state

    def make_inputs(requires_grad: bool):
        m = models()["default"]
        ids = _token_ids(B, L, shape["vocab"], case.seed, device)
        with torch.no_grad():
            emb = m.get_input_embeddings()(ids)
        return {"inputs_embeds": emb.detach().requires_grad_(requires_grad)}

    def runner_for(key, cast=None):
        def make(inp):
            m = models()[key] if cast is None else _fp32_copy()
            emb = inp["inputs_embeds"]
            prefill = mode == "fwd"

            def run():
                x = emb if cast is None else emb.to(cast)
                return m(inputs_embeds=x, use_cache=prefill).logits

            return run

        return make

    def _fp32_copy():
        if "fp32" not in state:
            state["fp32"] = copy.deepcopy(models()["default"]).float()
        return state["fp32"]

    half = dtype in _HALF
    impls = [Impl("attnkit", "attnkit", runner_for("attnkit"), available=transformers_available,
                  note="attn_implementation='attnkit' + attnkit.integrations.transformers.patch")]
    if half:
        impls.append(Impl("reference-fp32", "oracle", runner_for("default", torch.float32),
                          available=transformers_available, note="the default model in float32 (gate only)"))
    impls.append(Impl("transformers-default", "baseline", runner_for("default"), comparable=not half,
                      available=transformers_available, note="the model's default attention (sdpa)"))

    def flops(inp):
        return forward_flops(shape, B, L), None

    case = Case("models", family, L, mode, dtype, device,
                {"B": B, "L": L, "D": shape["head_dim"], "hidden": shape["hidden"], "layers": shape["layers"],
                 "heads": shape["heads"], "kv_heads": shape["kv_heads"]},
                make_inputs, ("inputs_embeds",), impls, flops, bwd_factor=1.5,
                tags={"tokens": B * L})
    return case


@register("models", "transformers models end to end", ("sparse_query_attention", "dynamic_mask_attention",
                                                       "lightning_attention"))
def model_cases(cfg: SuiteConfig) -> list[Case]:
    if transformers_available() is not None:
        return []
    B = cfg.batch or 1
    Ls = seqlens(cfg, gpu=[2048, 8192], cpu=[128, 256], gpu_quick=[2048], cpu_quick=[128])
    return [model_case(f, B=B, L=L, dtype=cfg.dtype, device=cfg.device, mode=m)
            for f in FAMILIES for L in Ls for m in cfg.modes]


# ----------------------------------------------------------------------------------------------
# tokens/s and peak memory of a prefill and a full training step
# ----------------------------------------------------------------------------------------------


def run_models(families=FAMILIES, *, device: str = "cuda", dtype=torch.bfloat16, B: int = 1,
               Ls=(2048, 8192), policy: TimingPolicy | None = None) -> list[dict]:
    """For each family and length, default attention vs attnkit: prefill (forward with cache, no
    grad) and training step (forward with labels + ``loss.backward()``) tokens/s and peak memory
    (CUDA only; None on CPU). Rows: family, L, impl, phase, ms, tokens_per_s, peak_mib, error."""
    policy = policy or TimingPolicy.for_device(device)
    rows = []
    for family in families:
        shape = model_shape(family, device == "cuda")
        base = build_model(family, shape, dtype=dtype, device=device)
        variants = {"transformers-default": base, "attnkit": attnkit_model(base)}
        for L in Ls:
            ids = _token_ids(B, L, shape["vocab"], 1234 + L, device)
            for name, m in variants.items():
                for phase in ("prefill", "train-step"):
                    row = {"family": family, "L": L, "B": B, "impl": name, "phase": phase, "ms": None,
                           "tokens_per_s": None, "peak_mib": None, "error": None}
                    fn = _phase_fn(m, ids, phase)
                    try:
                        t = measure(fn, device, policy)
                        peak = peak_memory_bytes(fn, device)
                        row["ms"] = t.median
                        row["tokens_per_s"] = B * L / (t.median * 1e-3)
                        row["peak_mib"] = None if peak is None else peak / 2 ** 20
                    except Exception as e:  # an OOM at the longest length is a result, not a crash
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    finally:
                        m.zero_grad(set_to_none=True)
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
        del variants, base
    return rows


def _phase_fn(model, ids, phase):
    if phase == "prefill":
        def prefill():
            with torch.no_grad():
                return model(input_ids=ids, use_cache=True).logits

        return prefill

    def train_step():
        model.train()
        try:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        finally:
            model.eval()
        return loss.detach()

    return train_step


def format_rows(rows: list[dict]) -> str:
    head = f"{'family':8} {'L':>6} {'phase':10} {'impl':22} {'ms':>9} {'tokens/s':>11} {'peak MiB':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            out.append(f"{r['family']:8} {r['L']:>6} {r['phase']:10} {r['impl']:22} {r['error']}")
            continue
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        out.append(f"{r['family']:8} {r['L']:>6} {r['phase']:10} {r['impl']:22} {r['ms']:9.2f} "
                   f"{r['tokens_per_s']:11.0f} {peak:>9}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnkit.bench.e2e",
                                 description="tokens/s and peak memory of small transformers models, "
                                             "attnkit vs default attention")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    ap.add_argument("--seqlens", default=None, help="comma list (default: 2048,8192 on CUDA, 128,256 on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    reason = transformers_available()
    if reason:
        print(reason)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    Ls = [int(x) for x in a.seqlens.split(",")] if a.seqlens else (
        [2048, 8192] if a.device == "cuda" else [128, 256])
    rows = run_models([f.strip() for f in a.families.split(",")], device=a.device, dtype=dtype, B=a.batch, Ls=Ls,
                      policy=TimingPolicy.for_device(a.device, quick=a.quick))
    print(format_rows(rows))
    return 0 if not any(r["error"] for r in rows) else 1


