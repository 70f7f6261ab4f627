"""Speed tooling: FLOP counts against hand counts, `th.py bench --json`, the profiler on a CPU run, and every speed
switch giving the plain path's loss (CPU, fp32; timings are never asserted)."""
import json
import os

import pytest
import torch

from helpers import shakespeare_chars, th
from thcore import perf
from thcore.config import ConfigError, from_dict
from thcore.engines.eager import EagerEngine
from thcore.loop import fit
from thcore.metrics import read_jsonl
from thcore.models import GPT, Transformer
from thcore.optim import AdamW
from thcore.profiler import summarize
from thcore.state import StepOptions, init_state
from thcore.step import loss_fn, train_step
from thcore.tasks.lm import LMConfig, LMTask


# -- FLOPs ----------------------------------------------------------------------------------------------
def test_gpt_flops_match_a_hand_count():
    model = GPT(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True)
    # N without wpe: wte 16*8 = 128; block: ln_1 16, c_attn 8*24+24 = 216, c_proj 64+8 = 72, ln_2 16,
    # c_fc 8*32+32 = 288, mlp.c_proj 32*8+8 = 264 -> 872; ln_f 16.  N = 1016.
    # per token: 6N + 12*L*H*Q*T = 6096 + 12*1*2*4*4 = 6480 (T = 4)
    assert perf.gpt_flops_per_token(model, 4) == 6480
    batch = {"idx": torch.zeros(3, 4, dtype=torch.long), "targets": torch.zeros(3, 4, dtype=torch.long)}
    assert perf.step_flops(model, batch) == 3 * 4 * 6480
    assert perf.step_flops(model, [batch, batch]) == 2 * 3 * 4 * 6480   # micro-batches add up


def test_transformer_flops_match_a_hand_count():
    model = Transformer(10, 12, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=16,
                        dropout=0.0)
    # encoder layer: 4 projections 4*(64+8) = 288, ffn 8*16+16 + 16*8+8 = 280, 2 norms 32 -> N_enc 600
    # decoder layer: 2 attentions 576 + ffn 280 + 3 norms 48 = 904, of which cross-attention k/v 144 run on
    # source tokens -> N_dec 760, N_kv 144; generator 8*12+12 = 108 (post-LN: no final norms)
    # source token: 6*(600+144) + 12*L*D*S = 4464 + 12*8*5 = 4944
    # target token: 6*(760+108) + 12*L*D*(T+S) = 5208 + 12*8*8 = 5976
    batch = {"src": torch.ones(2, 5, dtype=torch.long), "tgt_in": torch.ones(2, 3, dtype=torch.long),
             "targets": torch.ones(2, 3, dtype=torch.long)}
    assert perf.step_flops(model, batch) == 2 * (5 * 4944 + 3 * 5976)
    assert perf.step_flops(torch.nn.Linear(2, 2), batch) is None   # no formula: no MFU, no guess


# -- th.py bench --json ---------------------------------------------------------------------------------
FIGURES = {"ms_per_step", "ms_min", "ms_max", "tokens_per_s", "mfu", "peak_mem_gb"}


def test_bench_json_schema_and_profile(tmp_path):
    out = tmp_path / "bench"
    p = th("bench", "--n_layer=1", "--n_head=2", "--n_embd=16", "--vocab_size=64", "--batch_size=2",
           "--seq_len=16", "--steps=2", "--rounds=2", "--warmup=1", "--threads=1", "--against=module,hf",
           "--ce_chunk=8", "--profile=True", "--profile_steps=2", f"--out_dir={out}", "--json", timeout=240)
    res = json.loads(p.stdout)   # stdout is exactly one JSON object
    assert FIGURES | {"against", "flops_per_step", "peak_flops", "tokens_per_step"} <= set(res)
    assert set(res["against"]) == {"module", "hf"}
    for fig in [res, *res["against"].values()]:
        assert all(isinstance(fig[k], float) and fig[k] > 0 for k in FIGURES)
        assert fig["ms_min"] <= fig["ms_per_step"] <= fig["ms_max"]
    for peer in res["against"].values():   # ratio: our tokens/s over theirs
        assert peer["ratio"] == pytest.approx(res["tokens_per_s"] / peer["tokens_per_s"])
    assert res["tokens_per_step"] == 2 * 16 and res["switches"]["ce_chunk"] == 8
    assert res["flops_per_step"] == perf.step_flops(GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16),
                                                    {"idx": torch.zeros(2, 16, dtype=torch.long)})
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["top_ops"]
    assert "profile (2 steps, cpu)" in p.stderr


def test_bench_bad_peer_is_one_line():
    p = th("bench", "--against=nanogpt", check=False, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: against='nanogpt': peers are module, hf, eager"]


# -- the profiler on a run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    return shakespeare_chars(tmp_path_factory, 50_000)


def test_profiler_on_a_cpu_run(tmp_path, char_data):
    cfg = from_dict(LMConfig, {"name": "prof", "out_dir": str(tmp_path / "run"), "data_dir": char_data,
                               "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0,
                               "batch_size": 8, "max_steps": 8, "log_every": 4, "eval_iters": 2, "eval_every": 0,
                               "profile": True, "profile_steps": 4})
    fit(cfg, LMTask(cfg), EagerEngine(cfg))
    prof = tmp_path / "run" / "profile"
    tb = list((prof / "tb").glob("*.pt.trace.json"))   # TensorBoard profiler plugin layout
    assert len(tb) == 1
    with open(tb[0]) as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("name", "").startswith("ProfilerStep#") for e in events)
    with open(prof / "trace.json") as f:   # Chrome trace JSON
        assert json.load(f)["traceEvents"]
    s = summarize(str(prof / "trace.json"))
    assert s["steps"] == 4 and s["compute_s"] > 0 and 0 < s["step_time_s"]
    assert s["comm_s"] == 0 and s["comm_overlap"] is None   # one process: no collectives
    assert 0 <= s["data_wait_fraction"] < 1 and s["data_wait_s"] > 0   # the loader's time is its own range
    assert s["peak_mem_gb"]["cpu"] > 0
    saved = json.loads((prof / "summary.json").read_text())
    assert saved["top_ops"] and saved["steps"] == 4
    train = [r for r in read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8]
    for r in train:   # speed in every train line; time_s in every line, growing
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    rows = read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))
    times = [r["time_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0


# -- speed switches: the plain path's loss --------------------------------------------------------------
def tiny_state(vocab_multiple=1, **options):
    build = lambda: GPT(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=16,  # noqa: E731
                        vocab_multiple=vocab_multiple)
    return init_state(build, AdamW(weight_decay=0.1, impl=options.pop("impl", "auto")), seed=0, lr=1e-3,
                      options=StepOptions(**options))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 97, (3, 17), generator=g)
    b = {"idx": data[:, :-1], "targets": data[:, 1:].clone()}
    b["targets"][0, :5] = -100   # ignored positions
    return b


@pytest.mark.parametrize("vocab_multiple", [1, 64])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_chunked_cross_entropy_equals_plain(batch, label_smoothing, vocab_multiple):
    """Loss and every gradient, with 48 tokens in chunks of 7 (the last one short) and ignored targets; with a
    padded output layer (97 -> 128 rows) the fused loss runs over all 128 rows and its padded rows get no
    gradient, as the plain path's cut logits give none."""
    s = tiny_state(vocab_multiple)
    grads = {}
    for chunk in (0, 7):
        params = {k: p.detach().requires_grad_(True) for k, p in s.params.items()}
        loss, ntok = loss_fn(s.model, params, s.buffers, batch, label_smoothing, ce_chunk=chunk)
        grads[chunk] = loss, torch.autograd.grad(loss * 0.5, list(params.values()))   # scale flows through
    torch.testing.assert_close(grads[7][0], grads[0][0], rtol=1e-6, atol=1e-5)
    for a, b in zip(grads[7][1], grads[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_needs_an_output_layer(batch):
    s = init_state(lambda: Transformer(10, 10, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                       d_ff=16), options=StepOptions(ce_chunk=4))
    b = {"src": torch.ones(2, 3, dtype=torch.long), "tgt_in": torch.ones(2, 3, dtype=torch.long),
         "targets": torch.ones(2, 3, dtype=torch.long)}
    with pytest.raises(ConfigError, match="ce_chunk=4: Transformer has no output_params"):
        train_step(s, b)


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math"])
def test_sdpa_backend_equals_auto(batch, backend):
    """On CPU a GPU-only kernel falls through to the CPU's flash kernel: the code path runs, the math agrees."""
    plain, sw = tiny_state(), tiny_state(sdpa_backend=backend)
    for _ in range(2):
        plain, mp = train_step(plain, batch, donate=True)
        sw, ms = train_step(sw, batch, donate=True)
        torch.testing.assert_close(ms["loss_sum"], mp["loss_sum"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "for_loop"])
def test_optimizer_impl_equals_foreach(batch, impl):
    """torch's fused AdamW kernel runs on CPU too; it and the per-tensor loop agree with foreach."""
    ref, sw = tiny_state(impl="foreach"), tiny_state(impl=impl)
    for _ in range(3):
        ref, mr = train_step(ref, batch, donate=True)
        sw, ms = train_step(sw, batch, donate=True)
        torch.testing.assert_close(ms["loss_sum"], mr["loss_sum"], rtol=1e-5, atol=1e-5)
    for k in ref.params:
        torch.testing.assert_close(sw.params[k], ref.params[k], rtol=1e-5, atol=1e-6)


def test_cuda_graphs_and_chunked_loss_compiled_equal_eager(batch):
    """cuda_graphs compiles with mode="reduce-overhead" (on CPU nothing is captured): with the fused loss inside
    the compiled graph, two micro-batches (the path that copies graph outputs), the plain eager step's loss."""
    plain, sw = tiny_state(), tiny_state(cuda_graphs=True, ce_chunk=16)
    for _ in range(2):
        plain, mp = train_step(plain, [batch, batch], donate=True)
        sw, ms = train_step(sw, [batch, batch], donate=True)
        torch.testing.assert_close(ms["loss_sum"], mp["loss_sum"], rtol=1e-5, atol=1e-4)
    for k in plain.params:   # Adam turns rounding in near-zero gradients into up to ~lr/10 differences
        torch.testing.assert_close(sw.params[k], plain.params[k], rtol=1e-3, atol=2e-4)


def test_cuda_graphs_differentiate_parameters_over_the_states_own_storage(batch, monkeypatch):
    """Under cuda_graphs the step's leaves are Parameters aliasing the state's tensors (dynamo takes a Parameter
    for a static input: a graph replay reads the params in place, no copy into its inputs); otherwise plain
    leaves, aliasing them too."""
    from thcore import step
    seen = []

    def record(model, params, *args):
        seen.append(params)
        return step._micro_grads(model, params, *args)
    monkeypatch.setattr(step, "_grads_fn", lambda options: record)
    for cuda_graphs in (True, False):
        s = tiny_state(cuda_graphs=cuda_graphs)
        step.local_grads(s, [batch], torch.tensor(1.0), [0])
        for k, leaf in seen[-1].items():
            assert isinstance(leaf, torch.nn.Parameter) == cuda_graphs and leaf.requires_grad, k
            assert leaf.data_ptr() == s.params[k].data_ptr(), k


def test_switches_are_refused_where_the_engine_ignores_them():
    with pytest.raises(ConfigError, match="ce_chunk=64: only used with engine='eager' or 'ddp'"):
        from_dict(LMConfig, {"data_dir": "x", "engine": "fsdp", "ce_chunk": 64})
    with pytest.raises(ConfigError, match="cuda_graphs=True: only used with engine='eager'"):
        from_dict(LMConfig, {"data_dir": "x", "engine": "ddp", "cuda_graphs": True})


# -- th.py bench --suite=gpu: at toy size on a CPU ------------------------------------------------------
def test_gpu_suite_runs_every_case_in_its_own_process_at_toy_size(tmp_path):
    from thcore.bench import SUITE
    out = tmp_path / "suite"
    p = th("bench", "--suite=gpu", "--json", "--device=cpu", f"--out_dir={out}", timeout=900)
    res = json.loads(p.stdout)   # stdout is exactly one JSON object
    assert json.loads((out / "suite.json").read_text())["cases"] == res["cases"]   # and the file says the same
    cases = {c["case"]: c for c in res["cases"]}
    assert list(cases) == [name for name, _, _ in SUITE] and res["toy"]
    assert all("error" not in c for c in cases.values()), {k: c.get("error") for k, c in cases.items()}
    assert len({c["pid"] for c in cases.values()}) == len(cases) != os.getpid()   # one process per case
    for name, flags, _ in SUITE:
        c = cases[name]
        assert c["tokens_per_s"] > 0 and c["ms_per_step"] > 0 and c["host_peak_rss_gb"] > 0
        assert (c["engine"], c["zero_stage"], c["offload"], c["loop"]) == (
            flags.get("engine", "eager"), flags.get("zero_stage", 0), flags.get("offload", "none"),
            flags.get("loop", False))
        assert c["n_layer"] == 1 and c["batch_size"] == 2   # toy size
    ref = cases["gpt2-124m compiled vs module"]
    assert ref["ratio"] == ref["against"]["module"]["ratio"]
    loop = cases["gpt2-124m fit loop"]
    assert loop["ratio"] == pytest.approx(loop["tokens_per_s"] / ref["tokens_per_s"])
    ckpt = cases["gpt2-124m compiled + ckpt"]
    assert ckpt["switches"]["activation_checkpointing"] and ckpt["ratio"] == pytest.approx(
        ckpt["host_peak_rss_gb"] / ref["host_peak_rss_gb"])
    assert res["tests"]["summary"] == "not run: no GPU"
    assert "USDT" not in p.stderr and "Traceback" not in p.stderr


def test_bench_flags_are_one_config_class():
    from thcore.bench import BenchConfig, main
    import attrs
    assert all(f.metadata.get("help") for f in attrs.fields(BenchConfig))
    with pytest.raises(ConfigError, match=r"unknown config field 'zero_stag' \(did you mean 'zero_stage'\?\)"):
        main(zero_stag=2)
    with pytest.raises(ConfigError, match="zero_stage=2, offload='none': only with engine='deepspeed'"):
        main(zero_stage=2)
    with pytest.raises(ConfigError, match="offload='disk': must be one of"):
        main(engine="deepspeed", offload="disk")


def test_bench_times_the_fsdp_engine():
    """One process, a real FSDP2 engine (a 1-rank mesh): the same JSON as every engine."""
    import json
    from helpers import th
    out = json.loads(th("bench", "--engine=fsdp", "--offload=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32",
                        "--vocab_size=128", "--batch_size=2", "--seq_len=32", "--steps=2", "--rounds=1",
                        "--warmup=1", "--threads=1", "--json").stdout)
    assert out["engine"] == "fsdp" and out["offload"] == "cpu" and out["tokens_per_s"] > 0
