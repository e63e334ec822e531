"""Tests of the benchmark suite (python -m attnkit.bench): CLI, correctness gate, --compare, baselines.

The ops themselves are tested elsewhere. Here they are replaced (monkeypatched onto the attnkit
module) by small independent PyTorch implementations, which both lets the suite run before every op
exists and cross-checks the baselines the gate relies on: the fakes below compute each mechanism a
different way from attnkit.bench.baselines (top-k instead of sort+cumsum, a token-by-token recurrence
instead of chunks, dense membership masks instead of gathers).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench import baselines as bl
from attnkit.bench import cases as C
from attnkit.bench.__main__ import main, parse_seqlens
from attnkit.bench.report import compare_runs, load_json
from attnkit.bench.runner import Runner, compare
from attnkit.bench.timing import Timing, TimingPolicy

FAST = TimingPolicy(warmup=1, min_reps=2, max_reps=3, target_s=0.005, flush_l2=False)

# ----------------------------------------------------------------------------------------------
# independent fakes of the four ops
# ----------------------------------------------------------------------------------------------


def fake_sqa(q, k, v, *, causal=False, scale=None, return_lse=False):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    hq, hkv = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hkv > hq:
        qt = qt.repeat_interleave(hkv // hq, dim=1)
    lq, lk = q.shape[1], k.shape[1]
    mask = bl.causal_visible(lq, lk, q.device) if causal else None
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=hq > hkv)
    return o.transpose(1, 2)


def fake_dma(q, k, v, bias, *, keep, causal=True, scale=None):
    b, lq, hq, d = q.shape
    lk, g = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    vis = bl.causal_visible(lq, lk, q.device) if causal else torch.ones(lq, lk, dtype=torch.bool)
    masked = bias.detach()[:, :, None, :].expand(b, g, lq, lk).masked_fill(~vis, float("-inf"))
    idx = masked.topk(min(keep, lk), dim=-1).indices
    kept = torch.zeros(b, g, lq, lk, dtype=torch.bool).scatter(-1, idx, True) & vis
    add = torch.where(kept, bias[:, :, None, :].float(), torch.tensor(float("-inf")))
    add = add.repeat_interleave(hq // g, dim=1)
    return bl.eager_attention(q, k, v, causal=False, scale=scale, bias=add)


def fake_lightning(q, k, v, slopes, *, scale=1.0, **kw):
    b, l, h, dk = q.shape
    lam = torch.exp(-slopes.float())[None, :, None, None]
    state = torch.zeros(b, h, dk, v.shape[-1])
    outs = []
    for t in range(l):
        state = lam * state + k[:, t].float()[..., :, None] * v[:, t].float()[..., None, :]
        outs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t].float(), state))
    return torch.stack(outs, dim=1).to(q.dtype), state


def fake_routing_assign(q, k, centroids, *, cluster_size, shared_qk=True):
    def top(x):
        r = torch.einsum("blhd,hcd->bhcl", F.normalize(x.float(), dim=-1), centroids.float())
        return r.topk(cluster_size, dim=-1).indices.sort(dim=-1).values.int()

    qi = top(q)
    return qi, (qi if shared_qk else top(k))


def fake_routing_attention(q, k, v, q_idx, k_idx, *, causal=True, shared_qk=True, scale=None):
    b, l, h, d = q.shape
    c = q_idx.shape[2]
    scale = d ** -0.5 if scale is None else scale
    mq = torch.zeros(b, h, c, l, dtype=torch.bool).scatter(-1, q_idx.long(), True)
    mk = torch.zeros(b, h, c, l, dtype=torch.bool).scatter(-1, k_idx.long(), True)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * scale
    if shared_qk:
        s = s.masked_fill(torch.eye(l, dtype=torch.bool), -5e4)
    pos = torch.arange(l)
    out = torch.zeros(b, h, l, v.shape[-1])
    for ci in range(c):
        allowed = mq[:, :, ci, :, None] & mk[:, :, ci, None, :]
        if causal:
            allowed = allowed & (pos[None, :] <= pos[:, None])
        p = bl.safe_softmax(s.masked_fill(~allowed, float("-inf")))
        out = out + (p @ v.float().transpose(1, 2)) * mq[:, :, ci, :, None]
    out = out / mq.sum(2).clamp_min(1)[..., None]
    return out.transpose(1, 2).to(v.dtype)


def install_fakes(mp):
    mp.setattr(attnkit, "sparse_query_attention", fake_sqa, raising=False)
    mp.setattr(attnkit, "dynamic_mask_attention", fake_dma, raising=False)
    mp.setattr(attnkit, "lightning_attention", fake_lightning, raising=False)
    mp.setattr(attnkit, "routing_assign", fake_routing_assign, raising=False)
    mp.setattr(attnkit, "routing_attention", fake_routing_attention, raising=False)


@pytest.fixture
def fakes(monkeypatch):
    install_fakes(monkeypatch)


def run(case):
    return Runner("cpu", FAST).run_case(case)


# ----------------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------------


def test_parse_seqlens():
    assert parse_seqlens("1k,4k, 16384") == [1024, 4096, 16384]
    assert parse_seqlens("0.5k") == [512]
    with pytest.raises(Exception):
        parse_seqlens("abc")
    with pytest.raises(Exception):
        parse_seqlens("0")


def test_timing_median_and_iqr():
    t = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median == 3.0
    assert t.quartiles() == (2.0, 4.0)
    assert t.iqr == 2.0
    assert t.as_dict()["reps"] == 5


def test_flop_counts():
    assert C.causal_pairs(4, 4, True) == 10
    assert C.causal_pairs(2, 4, True) == 3 + 4  # bottom-right: row 0 sees keys 0..2
    assert C.causal_pairs(4, 2, True) == 0 + 0 + 1 + 2  # rows 0, 1 see nothing
    assert C.causal_pairs(3, 5, False) == 15
    assert C.kept_pairs(4, 4, 2, True) == 1 + 2 + 2 + 2
    assert C.kept_pairs(4, 4, 9, False) == 16


def test_compare_metric():
    ref = torch.randn(64, 8, dtype=torch.float64)
    assert compare(ref.float(), ref, (1e-5, 1e-6))["ok"]
    bad = ref.clone()
    bad[3, 2] += 1.0
    r = compare(bad, ref, (1e-3, 1e-4))
    assert not r["ok"] and r["max_rel"] > 0.1
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert not compare(nan, ref, (1.0, 1.0))["ok"]
    assert not compare(ref[:, :4], ref, (1.0, 1.0))["ok"]  # shape mismatch


def test_dma_kept_is_topk_with_ties_to_lower_position():
    torch.manual_seed(0)
    bias = torch.randint(0, 4, (2, 3, 11)).float()  # many ties
    lq, keep = 9, 3
    rows = torch.arange(lq)
    kept = bl.dma_kept(bl.dma_order(bias), lq, keep, True, rows)
    off = 11 - lq
    for b in range(2):
        for g in range(3):
            for i in range(lq):
                vis = list(range(min(i + off + 1, 11)))
                want = sorted(vis, key=lambda j: (-bias[b, g, j].item(), j))[:keep]
                got = kept[b, g, i].nonzero().flatten().tolist()
                assert got == sorted(want)


def test_registry_uses_only_ops_that_exist(monkeypatch):
    for name in ("dynamic_mask_attention", "lightning_attention", "routing_assign", "sparse_query_attention_varlen",
                 "sparse_query_attention_with_kvcache", "mixture_of_heads_attention",
                 "dynamic_mask_attention_with_kvcache"):
        monkeypatch.delattr(attnkit, name, raising=False)
    monkeypatch.setattr(attnkit, "sparse_query_attention", fake_sqa, raising=False)
    cfg = C.SuiteConfig(quick=True, modes=("fwd",))
    suite, notes = C.build_suite(cfg)
    assert suite and {c.op for c in suite} == {"sqa"}
    assert any("dma" in n and "dynamic_mask_attention" in n for n in notes)
    assert any("routing" in n and "routing_assign" in n for n in notes)
    _, notes = C.build_suite(cfg, ["nope"])
    assert "unknown op" in notes[0]


# ----------------------------------------------------------------------------------------------
# each mechanism end to end (gate + timing), against an independent fake
# ----------------------------------------------------------------------------------------------

TINY = {
    "sqa": lambda m: C.sqa.sqa_case("sqa", H=8, B=2, L=33, D=16, causal=True, dtype=torch.float32, device="cpu", mode=m),
    "rsqa": lambda m: C.sqa.sqa_case("rsqa", H=8, B=1, L=20, D=16, causal=False, dtype=torch.float32, device="cpu",
                                 mode=m),
    "dma": lambda m: C.dma.dma_case(B=1, L=40, H=4, Hkv=2, D=16, keep=7, causal=True, dtype=torch.float32,
                                device="cpu", mode=m),
    "lightning": lambda m: C.lightning.lightning_case(B=1, L=70, H=3, D=16, dtype=torch.float32, device="cpu", mode=m),
    "routing": lambda m: C.routing.routing_case(B=1, L=40, H=2, D=16, dtype=torch.float32, device="cpu", mode=m),
}


@pytest.mark.parametrize("mode", C.MODES)
@pytest.mark.parametrize("name", list(TINY))
def test_mechanism_gate_and_timing(fakes, name, mode):
    case = TINY[name](mode)
    res = run(case)
    op = res.op_result
    assert res.gate["status"] == "PASS", (op.status, op.note, op.gate_detail)
    assert op.status == "ok" and op.ms > 0 and op.timing["reps"] >= 2
    if mode == "fwd+bwd":
        assert {f"d{n}" for n in case.grad_names} <= set(op.gate_detail)
    # every comparable baseline that ran agrees with the reference as well
    for r in res.impls:
        if r.comparable and r.kind == "baseline" and r.status not in ("skip",):
            assert r.gate in ("ref", "PASS"), (r.name, r.status, r.note)
    assert res.flops and res.flops > 0 and op.tflops > 0
    if name in ("dma", "routing", "lightning"):
        assert res.dense_flops > 0 and op.dense_tflops > 0
    assert op.speedup is not None and op.speedup_vs
    json.dumps(res.to_json())  # serialisable


def test_routing_gate_checks_assignment(fakes, monkeypatch):
    def shifted(q, k, centroids, *, cluster_size, shared_qk=True):
        qi, ki = fake_routing_assign(q, k, centroids, cluster_size=cluster_size, shared_qk=shared_qk)
        return (qi + 1) % q.shape[1], (ki + 1) % q.shape[1]

    monkeypatch.setattr(attnkit, "routing_assign", shifted)
    res = run(TINY["routing"]("fwd"))
    op = res.op_result
    assert op.status == "FAIL" and not op.gate_detail["routing_assign"]["ok"]
    assert op.ms is None


def test_sqa_gate_prefers_float64_oracle(fakes, monkeypatch):
    import types

    calls = []

    def sqa_reference(q, k, v, causal=False, scale=None, return_lse=False):
        assert q.dtype == torch.float64
        calls.append(1)
        return fake_sqa(q, k, v, causal=causal, scale=scale)

    monkeypatch.setattr(attnkit, "reference", types.SimpleNamespace(sqa_reference=sqa_reference), raising=False)
    res = run(TINY["sqa"]("fwd+bwd"))
    assert calls and res.gate["reference"] == "reference-fp64"
    oracle = res.impl("reference-fp64")
    assert oracle.gate == "ref" and oracle.ms is None  # checked against, never timed
    assert res.op_result.gate == "PASS" and res.impl("torch-eager").gate == "PASS"


# ----------------------------------------------------------------------------------------------
# the gate catches wrong ops
# ----------------------------------------------------------------------------------------------


def test_gate_catches_wrong_forward(fakes, monkeypatch):
    def wrong(q, k, v, *, causal=False, scale=None, return_lse=False):
        return fake_sqa(q, k, v, causal=False, scale=scale)  # forgets the causal mask

    monkeypatch.setattr(attnkit, "sparse_query_attention", wrong)
    res = run(TINY["sqa"]("fwd"))
    op = res.op_result
    assert res.gate["status"] == "FAIL"
    assert op.status == "FAIL" and op.gate == "FAIL"
    assert op.timing is None and op.ms is None and op.tflops is None  # not timed
    assert op.gate_detail["output"]["max_rel"] > 1e-2
    assert "output" in op.note
    # the baselines are still timed
    assert res.impl("sdpa-flash").ms is not None


class _HalfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 0.5 * g


def test_gate_catches_wrong_backward(fakes, monkeypatch):
    def wrong_grad(q, k, v, *, causal=False, scale=None, return_lse=False):
        return fake_sqa(_HalfGrad.apply(q), k, v, causal=causal, scale=scale)

    monkeypatch.setattr(attnkit, "sparse_query_attention", wrong_grad)
    assert run(TINY["sqa"]("fwd")).gate["status"] == "PASS"  # the forward is right
    res = run(TINY["sqa"]("fwd+bwd"))
    op = res.op_result
    assert op.status == "FAIL"
    assert not op.gate_detail["dq"]["ok"] and op.gate_detail["dk"]["ok"] and op.gate_detail["output"]["ok"]


def test_gate_catches_wrong_shape_and_errors(fakes, monkeypatch):
    monkeypatch.setattr(attnkit, "sparse_query_attention",
                        lambda q, k, v, **kw: fake_sqa(q, k, v, **kw)[:, :-1])
    for mode in C.MODES:
        op = run(TINY["sqa"](mode)).op_result
        assert op.status == "FAIL" and op.ms is None

    def boom(*a, **k):
        raise NotImplementedError("not yet")

    monkeypatch.setattr(attnkit, "sparse_query_attention", boom)
    res = run(TINY["sqa"]("fwd"))
    assert res.op_result.status == "error" and "NotImplementedError" in res.op_result.note
    assert res.gate["status"] == "ERROR"


# ----------------------------------------------------------------------------------------------
# CLI: --quick on CPU writes JSON, table and PNGs; the gate's FAIL reaches table, JSON and exit code
# ----------------------------------------------------------------------------------------------

QUICK = ["--quick", "--device", "cpu", "--ops", "sqa", "--seqlens", "64,128", "--target-time", "0.005"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One in-process `--quick` CLI run on CPU (with the fake SQA), shared by the tests that read it."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench") / "run"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        install_fakes(mp)
        rc = main(QUICK + ["--out", str(out)])
    return rc, out, buf.getvalue()


def test_cli_quick_writes_json_table_and_png(quick_run):
    rc, out, stdout = quick_run
    assert rc == 0
    doc = load_json(out / "results.json")
    env = doc["environment"]
    for key in ("gpu", "sm_count", "driver", "torch", "cuda", "attnkit", "git_commit", "date"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert doc["config"]["dtype"] == "fp32" and doc["config"]["modes"] == ["fwd"]
    ids = [c["id"] for c in doc["cases"]]
    assert len(ids) == len(set(ids)) == 4  # mha and xsqa at two lengths
    for c in doc["cases"]:
        op = next(r for r in c["impls"] if r["impl"] == "attnkit")
        assert c["gate"]["status"] == "PASS" and op["status"] == "ok" and op["ms"] > 0
        assert op["speedup"] > 0 and op["tflops"] > 0
    for name in ("latency_sqa.png", "speedup_sqa.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "attnkit" in (out / "table.md").read_text()
    assert "sdpa-flash" in stdout and "CPU numbers" in stdout


def test_cli_marks_gate_failure(fakes, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(attnkit, "sparse_query_attention",
                        lambda q, k, v, *, causal=False, scale=None: 1.01 * fake_sqa(q, k, v, causal=causal,
                                                                                     scale=scale))
    out = tmp_path / "bad"
    rc = main(QUICK + ["--out", str(out), "--seqlens", "64", "--no-plots"])
    stdout = capsys.readouterr().out
    assert rc == 2
    assert "GATE FAILED" in stdout and "FAIL" in stdout
    doc = load_json(out / "results.json")
    for c in doc["cases"]:
        assert c["gate"]["status"] == "FAIL"
        op = next(r for r in c["impls"] if r["impl"] == "attnkit")
        assert op["status"] == "FAIL" and op["ms"] is None


def test_compare_flags_slower_case(quick_run, tmp_path, capsys):
    _, out, _ = quick_run
    new = load_json(out / "results.json")
    old = copy.deepcopy(new)
    slow_id = new["cases"][1]["id"]
    for c in old["cases"]:
        if c["id"] == slow_id:
            op = next(r for r in c["impls"] if r["impl"] == "attnkit")
            op["ms"] = op["ms"] / 2  # the old run was twice as fast: the new one regressed
    rows = compare_runs(old, new, threshold=0.1)
    reg = [r for r in rows if r["verdict"] == "REGRESSION"]
    assert [(r["id"], r["impl"]) for r in reg] == [(slow_id, "attnkit")]
    assert reg[0]["change"] == pytest.approx(0.5)
    assert all(r["verdict"] == "same" for r in rows if r["verdict"] != "REGRESSION")
    back = [r for r in compare_runs(new, old) if r["verdict"] == "faster"]
    assert [(r["id"], r["impl"]) for r in back] == [(slow_id, "attnkit")]

    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    capsys.readouterr()
    rc = main(["--compare", str(old_path), "--against", str(out / "results.json"), "--fail-on-regression"])
    text = capsys.readouterr().out
    assert rc == 3
    assert "REGRESSION" in text and "1 REGRESSION(S)" in text
    assert main(["--compare", str(out / "results.json"), "--against", str(out / "results.json"),
                 "--fail-on-regression"]) == 0


def test_compare_flags_gate_regression(quick_run):
    _, out, _ = quick_run
    old = load_json(out / "results.json")
    new = copy.deepcopy(old)
    op = next(r for r in new["cases"][0]["impls"] if r["impl"] == "attnkit")
    op.update(status="FAIL", gate="FAIL", ms=None)
    rows = [r for r in compare_runs(old, new) if r["verdict"] == "REGRESSION"]
    assert len(rows) == 1 and rows[0]["impl"] == "attnkit"


def test_module_entry_point_subprocess(tmp_path):
    """`python -m attnkit.bench` with the real build: whatever SQA is (missing, unimplemented or real), it
    runs, and a wrong real op would show up as exit code 2."""
    env = dict(os.environ)
    pkg_root = str(Path(attnkit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "sub"
    p = subprocess.run([sys.executable, "-m", "attnkit.bench", "--quick", "--device", "cpu", "--ops", "sqa",
                        "--seqlens", "64", "--threads", "1", "--target-time", "0.005", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "attnkit-bench/1" and doc["cases"]
    assert (out / "latency_sqa.png").exists()


def test_cli_compare_while_running(fakes, quick_run, tmp_path, capsys):
    """--compare OLD.json with a run: the new run is compared with OLD at the end; a bad OLD fails early."""
    _, out, _ = quick_run
    old = load_json(out / "results.json")
    for c in old["cases"]:
        for r in c["impls"]:
            if r["impl"] == "attnkit" and r["ms"]:
                r["ms"] /= 100.0  # pretend the old run was far faster: every attnkit row regressed
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    rc = main(QUICK + ["--out", str(tmp_path / "again"), "--no-plots", "--compare", str(old_path),
                       "--fail-on-regression"])
    text = capsys.readouterr().out
    regressed = [ln for ln in text.splitlines() if " attnkit " in ln and "REGRESSION" in ln]
    assert rc == 3 and len(regressed) == len(old["cases"])  # baselines may differ too: timing noise
    assert main(QUICK + ["--out", str(tmp_path / "x"), "--compare", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "x").exists()  # nothing was run


def test_case_that_cannot_build_inputs_does_not_stop_the_suite(fakes):
    case = TINY["sqa"]("fwd")

    def broken(requires_grad):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    case.make_inputs = broken
    res = run(case)
    assert res.gate["status"] == "ERROR"
    assert all(r.status == "oom" for r in res.impls)
    json.dumps(res.to_json())


def test_cpu_targets_speed_and_thread_rows(monkeypatch):
    """The CPU targets read the suite's own timings, and time thread scaling on the same case."""
    from attnkit.bench import cpu_targets as T
    from attnkit.bench.cases.sqa import sqa_case

    case = sqa_case("mha", H=2, B=1, L=64, D=16, causal=True, dtype=torch.float32, device="cpu", mode="fwd")
    res = Runner("cpu", FAST).run_case(case)
    a, b = res.impl("attnkit"), res.impl("sdpa-flash")
    assert a.ms and b.ms
    target = T.SpeedTarget("t", "sqa", case.variant, 64, "fwd", "sdpa-flash", 0.0)
    monkeypatch.setattr(T, "SPEED_TARGETS", (target, T.SpeedTarget("absent", "sqa", case.variant, 128, "fwd",
                                                                     "sdpa-flash", 1.0)))
    monkeypatch.setattr(T, "SCALING_CASES", (("sqa", case.variant, 64, "fwd"),))
    monkeypatch.setattr(T, "SCALING_ROUNDS", 1)
    monkeypatch.setattr(T, "REFERENCE_MM", 64)
    threads = torch.get_num_threads()
    rows = T.evaluate([res], Runner("cpu", FAST))
    assert torch.get_num_threads() == threads  # left as found
    assert rows[0]["value"] == pytest.approx(b.ms / a.ms) and rows[0]["verdict"] == "OK"
    assert rows[1]["value"] is None and rows[1]["verdict"] == "not run"
    scale = rows[2]
    if threads >= 2:
        assert scale["value"] > 0 and scale["verdict"] in ("OK", "MISS") and "with 1 thread" in scale["detail"]
    else:
        assert scale["verdict"] == "not run"
    ref = rows[3]
    assert ref["target"].startswith("reference: torch.mm") and ref["goal"] is None
    if threads >= 2:
        assert ref["value"] > 0 and ref["verdict"] == "reference"
    else:
        assert ref["verdict"] == "not run"
    md = T.render(rows)
    assert md.count("\n| ") == len(rows) + 1 and ">= 0.00x" in md and "<= 0.60x" in md
    assert "| reference: torch.mm" in md and " | - | " in md


def test_decode_case_reports_bandwidth():
    from attnkit.bench.cases.sqa_decode import decode_case
    from attnkit.bench.report import table_rows

    case = decode_case(B=2, Lk=96, Hq=4, Hkv=2, D=16, dtype=torch.float32, device="cpu")
    res = Runner("cpu", FAST).run_case(case)
    op = res.op_result
    assert op.gate == "PASS" and op.ms
    assert op.gbps == pytest.approx(2 * 2 * 96 * 2 * 16 * 4 / (op.ms * 1e-3) / 1e9)
    doc = {"cases": [res.to_json()]}
    row = next(r for r in table_rows(doc)["sqa-decode"] if r and r[4] == "attnkit")
    assert row[10] == f"{op.gbps:.0f}"


def test_dma_decode_case_gate_and_bandwidth():
    from attnkit.bench.cases.dma_decode import dma_decode_case

    case = dma_decode_case(B=2, Lk=150, Hq=4, Hkv=2, D=16, keep=20, dtype=torch.float32, device="cpu")
    res = Runner("cpu", FAST).run_case(case)
    op = res.op_result
    assert op.gate == "PASS" and op.ms
    assert op.gbps == pytest.approx(2 * 2 * 150 * 2 * 16 * 4 / (op.ms * 1e-3) / 1e9)
    eager = next(r for r in res.impls if r.name == "torch-eager")
    assert eager.gate in ("ref", "PASS"), (eager.status, eager.note)
