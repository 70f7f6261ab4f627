"""GPU readiness, checked on a CPU: what cannot be timed here must not come back unnoticed.

- No host synchronisation per step: a counting shim around every operation that makes the host wait for a CUDA
  device (Tensor.item / __bool__ / __float__ / tolist / cpu / numpy, device tensors built from Python data,
  torch.cuda.synchronize) over N fit-loop steps on the accelerator path (`step._host_check_is_free` -> False:
  what CUDA runs) allows one per log step.
- No per-step copies: torch's fused AdamW skips a non-finite step itself (found_inf) exactly as the select did.
- The fp16 loss scale lives on the device (every DDP rank's decision: tests/integration/test_fp16_ddp.py).
- Every parameter is stored once after engine.init; a padded vocabulary keeps Hugging Face's logits.
The `gpu`-marked twins run the same checks on CUDA with torch's own sync detector and allocator counters.
"""
import json
import os

import pytest
import torch

from helpers import probe_batch, probe_state, shakespeare_chars
from thcore import step as step_mod
from thcore import tree
from thcore.config import Config, from_dict
from thcore.engines.eager import EagerEngine
from thcore.loop import fit
from thcore.metrics import read_jsonl
from thcore.models import GPT
from thcore.optim import AdamW
from thcore.state import StepOptions, init_state
from thcore.step import loss_fn, train_step
from thcore.tasks.lm import LMConfig, LMTask

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class SyncCounter:
    """Counts calls that synchronise a CUDA host with its device (on a CPU they are free, and invisible)."""
    TENSOR = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "new_tensor")

    def __init__(self, monkeypatch):
        self.on, self.calls = False, []
        for name in self.TENSOR:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(torch.cuda.synchronize, "cuda.synchronize"))
        for name in ("tensor", "as_tensor"):   # Python data onto a device named explicitly: a blocking copy
            monkeypatch.setattr(torch, name, self._wrap(getattr(torch, name), name,
                                                        when=lambda *a, **k: k.get("device") is not None))

    def _wrap(self, fn, name, when=lambda *a, **k: True):
        def counted(*args, **kwargs):
            if self.on and when(*args, **kwargs):
                self.calls.append(name)
            return fn(*args, **kwargs)
        return counted

    def paused(self, fn):
        """`fn` with counting off: evaluation and checkpoints are not the per-step path."""
        def run(*args, **kwargs):
            was, self.on = self.on, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.on = was
        return run


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    return shakespeare_chars(tmp_path_factory, 20_000)


def lm_cfg(tmp_path, data, **kw):
    return from_dict(LMConfig, {"name": "sync", "out_dir": str(tmp_path / "run"), "data_dir": data, "n_layer": 1,
                                "n_head": 2, "n_embd": 16, "block_size": 16, "dropout": 0.0, "batch_size": 4,
                                "eval_iters": 1, "eval_every": 0, "max_steps": 9, "log_every": 4,
                                "optimizer_impl": "fused", "lr_schedule": "constant", **kw})


def counted_fit(cfg, counter):
    """fit() with the counter on from the end of the first step (a scalar's first move to the device is once)."""
    task, engine = LMTask(cfg, log=lambda *a, **k: None), EagerEngine(cfg)
    task.evaluate = counter.paused(task.evaluate)
    engine.save = counter.paused(engine.save)
    loader = task.train_loader

    def host_batches(*args):   # the loader builds host tensors (read back freely: nothing waits for a GPU)
        it = loader(*args)
        while True:
            batch = counter.paused(next)(it, None)
            if batch is None:
                return
            yield batch
    task.train_loader = host_batches
    step = engine.step
    steps = []

    def counting_step(state, batch):
        out = step(state, batch)
        steps.append(len(counter.calls))
        counter.on = True
        return out
    engine.step = counting_step
    state = fit(cfg, task, engine)
    counter.on = False
    return state, steps


@pytest.mark.parametrize("precision,ema", [("fp32", 0.0), ("bf16", 0.9), ("fp16", 0.0)])
def test_fit_loop_syncs_at_most_once_per_log_step(tmp_path, char_data, monkeypatch, precision, ema):
    """8 counted steps (2..9), log_every 4: the log steps 4, 8 and the last (9) may read back once each."""
    monkeypatch.setattr(step_mod, "_host_check_is_free", lambda device: False)   # the path CUDA takes
    counter = SyncCounter(monkeypatch)
    cfg = lm_cfg(tmp_path, char_data, precision=precision, ema_decay=ema)
    state, _ = counted_fit(cfg, counter)
    assert state.step == 9
    assert len(counter.calls) <= 3, counter.calls
    rows = [r for r in read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [4, 8, 9] and all(r["grad_norm"] > 0 for r in rows)


def test_the_counter_sees_a_per_step_sync(tmp_path, char_data, monkeypatch):
    """The guard can fail: a step that reads one flag back is counted at every step."""
    monkeypatch.setattr(step_mod, "_host_check_is_free", lambda device: False)
    counter = SyncCounter(monkeypatch)
    real = step_mod.train_step

    def reads_back(*a, **k):
        state, m = real(*a, **k)
        bool(m["nonfinite"])
        return state, m
    monkeypatch.setattr("thcore.engines.eager.train_step", reads_back)
    counted_fit(lm_cfg(tmp_path, char_data), counter)
    assert counter.calls.count("__bool__") == 8


# -- fused kernels skip a non-finite step themselves -----------------------------------------------------
# Probe, probe_state, probe_batch: a two-layer model and its batches (tests/helpers.py)
def same(a, b) -> bool:
    la, lb = tree.tree_leaves(a), tree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_fused_found_inf_skips_exactly_as_the_select_did(monkeypatch, donate):
    """On the accelerator path with the fused kernel nothing is copied: a non-finite batch leaves params, both
    moments, Adam's step counts and the EMA bitwise as they were, and the next good step is the one taken
    without the bad batch. The select path (foreach kernel) gives the same answer."""
    monkeypatch.setattr(step_mod, "_host_check_is_free", lambda device: False)
    for impl in ("fused", "foreach"):
        state, _ = train_step(probe_state(impl, ema_decay=0.9), probe_batch(1))
        before = state.clone()
        new, m = train_step(state, probe_batch(bad=True), donate=donate)
        assert bool(m["nonfinite"]) and new.step == before.step + 1
        assert same(new.params, before.params) and same(new.opt_state, before.opt_state)
        assert same(new.ema, before.ema)
        assert all(float(t) == 1.0 for t in new.opt_state["step"].values())   # the step count was undone
        after, m = train_step(new, probe_batch(2))
        ref, _ = train_step(before.replace(step=before.step + 1), probe_batch(2))
        assert not bool(m["nonfinite"]) and same(after.params, ref.params) and same(after.opt_state, ref.opt_state)
        assert same(after.ema, ref.ema)


def test_fused_path_equals_the_host_path(monkeypatch):
    """grad_scale (clipping folded into the kernel's divisor) against clipping the gradients first: 4 steps
    with clipping active (clip_grad 0.05), the same params to rounding."""
    host, dev = probe_state(clip_grad=0.05, ema_decay=0.5), probe_state(clip_grad=0.05, ema_decay=0.5)
    for i in range(4):
        host, mh = train_step(host, probe_batch(i), donate=True)
        with monkeypatch.context() as mp:
            mp.setattr(step_mod, "_host_check_is_free", lambda device: False)
            dev, md = train_step(dev, probe_batch(i), donate=True)
        assert float(mh["grad_norm"]) > 0.05   # clipping did something
        torch.testing.assert_close(md["grad_norm"], mh["grad_norm"], rtol=1e-6, atol=0)
    torch.testing.assert_close(dev.params, host.params, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dev.ema, host.ema, rtol=1e-6, atol=1e-7)
    assert same(dev.opt_state["step"], host.opt_state["step"])


# -- fp16: the loss scale on the device -----------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_fp16_scale_on_the_device_decides_as_the_host_did(monkeypatch, impl):
    """Overflow: update skipped, scale halved; a non-finite loss: a NaN step, scale kept; growth after
    loss_scale_growth_interval good steps. Host (floats) and device (tensors) paths: the same scales, exactly."""
    runs = {}
    for path in ("host", "device"):
        with monkeypatch.context() as mp:
            if path == "device":
                mp.setattr(step_mod, "_host_check_is_free", lambda device: False)
            s = probe_state(impl, precision="fp16", loss_scale_growth_interval=2).replace(loss_scale=2.0 ** 120)
            seen = []
            for batch in (probe_batch(0), probe_batch(1, bad=True), probe_batch(2), probe_batch(3),
                          probe_batch(4)):
                prev = s.clone()
                s, m = train_step(s, batch)
                seen.append((float(s.loss_scale), int(s.good_steps), bool(m["nonfinite"]),
                             bool(m.get("skipped", False)), same(s.params, prev.params)))
            runs[path] = seen, s
            if path == "device":
                assert isinstance(s.loss_scale, torch.Tensor) and s.loss_scale.device == s.params["lin.weight"].device
    assert runs["device"][0] == runs["host"][0]
    # 2^120: the fp16 backward overflows -> 2^119 ... until the scaled gradients fit; the bad batch keeps it
    scales = [r[0] for r in runs["host"][0]]
    assert scales[0] == 2.0 ** 119 and runs["host"][0][0][3] and runs["host"][0][0][4]
    assert runs["host"][0][1][2] and runs["host"][0][1][0] == scales[0] and runs["host"][0][1][4]
    torch.testing.assert_close(runs["device"][1].params, runs["host"][1].params, rtol=1e-5, atol=1e-6)
    meta = runs["device"][1].meta()   # a checkpoint's state.json holds plain numbers
    assert json.loads(json.dumps(meta))["loss_scale"] == scales[-1]


# -- stored once ------------------------------------------------------------------------------------------
def storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if t.device.type != "meta"}


def test_every_parameter_is_stored_once_after_engine_init(tmp_path, char_data):
    cfg = lm_cfg(tmp_path, char_data, ema_decay=0.0)
    task = LMTask(cfg, log=lambda *a, **k: None)
    engine = EagerEngine(cfg)
    state = engine.init(task.init_state(1))
    module = [*state.model.parameters(), *state.model.buffers()]
    mine = storages([*state.params.values(), *state.buffers.values()])
    assert storages(module) <= mine, "the module holds tensors of its own"
    assert len(storages(state.params.values())) == len(state.params)   # no two params share storage
    state, _ = engine.step(state, [next(iter(task.train_loader(0, 0, engine)))])
    assert storages([*state.model.parameters()]) <= storages(state.params.values())   # and after a step


# -- vocabulary padding ----------------------------------------------------------------------------------
def test_padded_vocab_keeps_hf_logits_loss_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    from thcore.interop import hf_gpt2
    torch.manual_seed(0)
    shape = dict(vocab_size=100, n_positions=16, n_layer=2, n_head=2, n_embd=32)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    hf.save_pretrained(tmp_path / "hf")
    args, params, _ = hf_gpt2.load_gpt(str(tmp_path / "hf"), vocab_multiple=64)
    assert args["vocab_multiple"] == 64 and params["transformer.wte.weight"].shape == (128, 32)
    padded = GPT(**args).eval()
    assert padded.transformer.wte.weight.shape == padded.lm_head.weight.shape == (128, 32)
    idx = torch.randint(0, 100, (2, 16))
    from thcore import func
    with torch.no_grad():
        ours = func.apply(padded, params, {}, idx)
        ref = hf(idx).logits
    assert ours.shape == ref.shape == (2, 16, 100) and (ours - ref).abs().max() <= 1e-4
    # the loss of the padded model is the unpadded one's, plain and chunked
    _, plain_params, _ = hf_gpt2.load_gpt(str(tmp_path / "hf"))
    batch = {"idx": idx, "targets": torch.randint(0, 100, (2, 16))}
    unpadded = GPT(**{k: v for k, v in args.items() if k != "vocab_multiple"}).eval()
    want, _ = loss_fn(unpadded, plain_params, {}, batch)
    for chunk in (0, 7):
        got, _ = loss_fn(padded, params, {}, batch, ce_chunk=chunk)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    # training never moves the padded rows; export crops them, and transformers loads the result
    state = init_state(lambda: GPT(**args), AdamW(weight_decay=0.1), lr=1e-2)
    with torch.no_grad():
        state.params["transformer.wte.weight"][100:] = 0
    state, _ = train_step(state, batch)
    assert state.params["transformer.wte.weight"][100:].abs().max() == 0
    sd = hf_gpt2.to_hf(state.params, 2, vocab_size=100)
    assert sd["transformer.wte.weight"].shape == (100, 32)


def test_tf32_is_turned_on_for_gpus_only():
    from thcore.engines import use_tf32
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        use_tf32(torch.device("cpu"))
        assert torch.backends.cuda.matmul.fp32_precision == before
        use_tf32(torch.device("cuda"))   # sets the flags only: no CUDA call
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
        torch.backends.cudnn.conv.fp32_precision = before


def test_deepspeed_config_has_no_synchronising_timer():
    pytest.importorskip("deepspeed")
    from thcore.engines.deepspeed import build_config
    from deepspeed.runtime.config import DeepSpeedConfig
    ds = build_config(Config(engine="deepspeed", zero_stage=2, batch_size=2), 1)
    timer = DeepSpeedConfig(ds).timers_config   # DeepSpeed's own reading of it
    assert not timer.enabled and not timer.synchronized


# -- GPU twins --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision,impl", [("bf16", "fused"), ("fp16", "fused"), ("fp32", "foreach")])
def test_gpu_train_step_never_syncs(precision, impl):
    """torch's own detector: any synchronising call in a step raises."""
    state = init_state(lambda: GPT(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=64,
                                   vocab_multiple=64), AdamW(weight_decay=0.1, impl=impl), lr=1e-3,
                       options=StepOptions(precision=precision, ema_decay=0.9), device="cuda")
    state = EagerEngine(Config(device="cuda")).init(state)
    data = torch.randint(0, 50257, (4, 65), device="cuda")
    batch = {"idx": data[:, :-1], "targets": data[:, 1:]}
    state, _ = train_step(state, batch, donate=True)   # the first step moves the fp16 scale to the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            state, m = train_step(state, batch, donate=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(m["loss_sum"]).item()


@pytest.mark.gpu
@cuda
def test_gpu_fit_loop_syncs_once_per_log_step(tmp_path, char_data):
    import warnings
    cfg = lm_cfg(tmp_path, char_data, device="cuda", precision="bf16", optimizer_impl="auto")
    task, engine = LMTask(cfg, log=lambda *a, **k: None), EagerEngine(cfg)
    step, seen = engine.step, {"on": False, "n": 0}

    def counting_step(state, batch):
        out = step(state, batch)
        if not seen["on"]:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            seen["on"] = True
        return out
    engine.step = counting_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task.evaluate = lambda *a, **k: {}
        engine.save = lambda *a, **k: None
        try:
            fit(cfg, task, engine)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 3, [str(w.message) for w in syncs]   # log steps 4, 8 and 9


@pytest.mark.gpu
@cuda
def test_gpu_memory_after_init_is_the_state_alone():
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    cfg = Config(device="cuda")
    state = init_state(lambda: GPT(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=128,
                                   vocab_multiple=64), AdamW(), device="cuda")
    state = EagerEngine(cfg).init(state)
    tensors = [*state.params.values(), *tree.tree_leaves(state.opt_state), *state.buffers.values()]
    want = sum(t.untyped_storage().nbytes() for t in tensors)
    assert torch.cuda.memory_allocated() - base <= want + 512 * len(tensors)   # allocator rounding only
    assert all(p.device.type == "cuda" for p in state.model.parameters())   # nothing left on the host


@pytest.mark.gpu
@pytest.mark.bitwise
@cuda
def test_gpu_resume_is_bitwise_the_uninterrupted_run(tmp_path, char_data):
    """As on CPU (tests/integration/test_lm.py): cut at step 4 and resumed, the fp32 run ends bitwise equal to the one that never
    stopped; the deterministic kernels (conftest's deterministic_cuda) make the comparison meaningful."""
    assert torch.are_deterministic_algorithms_enabled()
    quiet = dict(log=lambda *a, **k: None)
    ref_cfg = lm_cfg(tmp_path, char_data, device="cuda", out_dir=str(tmp_path / "ref"), max_steps=8)
    ref = fit(ref_cfg, LMTask(ref_cfg, **quiet), EagerEngine(ref_cfg))
    for steps in (4, 8):
        cfg = lm_cfg(tmp_path, char_data, device="cuda", out_dir=str(tmp_path / "cut"), max_steps=steps)
        cut = fit(cfg, LMTask(cfg, **quiet), EagerEngine(cfg))
    assert cut.step == 8 and all(torch.equal(ref.params[k], cut.params[k]) for k in ref.params)


def test_deterministic_cuda_is_inert_on_cpu_and_sets_both_on_cuda(monkeypatch):
    from helpers import CUBLAS_DETERMINISTIC, deterministic_cuda
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with deterministic_cuda():
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # the flags only: no CUDA call
    with deterministic_cuda():
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    """2 processes with device=auto on a 1-GPU machine: rank 1 is told why, instead of crashing on cuda:1."""
    from thcore.config import ConfigError
    from thcore.engines import runtime
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime.backend_and_device("auto", 0) == ("nccl", torch.device("cuda", 0))
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 but the machine shows 1 GPU; start at most 1 process "
                                          r"per node \(--nproc=1\)"):
        runtime.backend_and_device("auto", 1)
