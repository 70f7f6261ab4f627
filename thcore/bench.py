"""`th.py bench`: ms/step, tokens/s, MFU and peak memory of our training step, against peers in the same process.

    python th.py bench --model=gpt2 --n_layer=12 --n_head=12 --n_embd=768 --batch_size=12 --seq_len=1024 \
        --precision=bf16 [--engine=eager|ddp|deepspeed] [--compile=True] [--against=module,hf] [--json]

Ours is `engine.step` (train_step with donation) on a GPT (or `--model=transformer`, the encoder-decoder) with
dropout 0, AdamW (weight decay on matrices) and global-norm clipping. Peers run the same configuration:
`module`, the same model as a plain nn.Module + torch.optim.AdamW loop (compiled when we compile); `hf`,
transformers' GPT2LMHeadModel (sdpa attention, its own loss from `labels`; eager, as its users train it);
`eager`, our own step uncompiled (with --compile=True: compile's gain). Every runner warms up, then they take
turns for `rounds` rounds of `steps` steps each, so machine drift hits all alike; each step is timed alone (CUDA
events on GPU, a monotonic clock on CPU) and the medians are compared: ratio = our tokens/s over theirs.

FLOPs and MFU: thcore/perf.py. Peak memory (`peak_mem_gb`): the runner's params and optimizer state plus the
most a step allocates above what was allocated when it started (several runners share the process, so the
process-wide peak would say nothing about one of them); read from the CUDA allocator, or on CPU from the
profiler's allocator trace of one extra step.
"""
import json as jsonlib
import os
import socket
import statistics
import sys
import tempfile
import time

import attrs
import torch
import torch.nn.functional as F

from . import perf
from .config import Config, ConfigError
from .func import pick_device
from .models import GPT, GPT_PRESETS, Transformer
from .optim import AdamW, _groups, _impl
from .profiler import Profiler
from .state import StepOptions, init_state
from .step import IGNORE, autocast, sdpa_backend

PEERS = ("module", "hf", "eager")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# -- models and batches ---------------------------------------------------------------------------------

def model_args(model, n_layer, n_head, n_embd, vocab_size, seq_len, activation_checkpointing):
    if model == "transformer":
        n_layer, n_head, n_embd = n_layer or 6, n_head or 8, n_embd or 512
        return dict(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, d_model=n_embd, num_heads=n_head,
                    num_encoder_layers=n_layer, num_decoder_layers=n_layer, d_ff=4 * n_embd, dropout=0.0,
                    max_len=seq_len + 1, activation_checkpointing=activation_checkpointing)
    if model not in GPT_PRESETS:
        raise ConfigError(f"model={model!r}: one of {', '.join([*GPT_PRESETS, 'transformer'])}")
    shape = {**GPT_PRESETS[model], **{k: v for k, v in dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd).items()
                                      if v}}
    return dict(vocab_size=vocab_size, block_size=seq_len, dropout=0.0, bias=True,
                activation_checkpointing=activation_checkpointing, **shape)


def make_batch(model, batch_size, seq_len, vocab_size, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if model == "transformer":   # token ids >= 4 (0 is padding): every position is a real token
        src = torch.randint(4, vocab_size, (batch_size, seq_len), generator=gen)
        tgt = torch.randint(4, vocab_size, (batch_size, seq_len + 1), generator=gen)
        batch = {"src": src, "tgt_in": tgt[:, :-1], "targets": tgt[:, 1:]}
    else:
        data = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
        batch = {"idx": data[:, :-1], "targets": data[:, 1:]}
    return {k: v.contiguous().to(device) for k, v in batch.items()}


# -- runners: each is (step function, resident tensors) --------------------------------------------------

def _torch_adamw(model, impl, device, lr, weight_decay):
    params = dict(model.named_parameters())
    groups = [{"params": [params[k] for k in names], "weight_decay": wd}
              for names, wd in zip(_groups(params), (weight_decay, 0.0)) if names]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **_impl(device, impl))


def module_runner(build, batch, opts, impl, device, lr, weight_decay):
    """The plain loop everybody writes: model(...) -> loss -> backward -> clip -> AdamW.step()."""
    torch.manual_seed(0)
    model = build().to(device)
    opt = _torch_adamw(model, impl, device, lr, weight_decay)
    fwd = torch.compile(model) if opts.compile else model
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    targets = batch["targets"]

    def step():
        with sdpa_backend(opts.sdpa_backend), autocast(opts.precision, device):
            logits = fwd(**inputs)
            loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip_grad, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, lambda: [*model.parameters(), *_opt_tensors(opt)]


def hf_runner(args, batch, opts, impl, device, lr, weight_decay):
    """transformers' GPT2LMHeadModel with sdpa attention, trained as its users do (loss from `labels`)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ConfigError("against=hf: transformers is not installed (pip install transformers)") from None
    cfg = GPT2Config(vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
                     n_layer=args["n_layer"], n_head=args["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, activation_function="gelu_new", use_cache=False, bos_token_id=None,
                     eos_token_id=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(device).train()
    assert model.config._attn_implementation == "sdpa"
    opt = _torch_adamw(model, impl, device, lr, weight_decay)
    idx = batch["idx"]

    def step():   # eager, torch's own attention kernel choice: the model as its users train it
        with autocast(opts.precision, device):
            loss = model(input_ids=idx, labels=idx).loss   # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip_grad, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, lambda: [*model.parameters(), *_opt_tensors(opt)]


def _opt_tensors(opt):
    return [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def _single_process_env():
    """A one-process group for engine=ddp/deepspeed outside torchrun (a real reducer / DeepSpeed engine)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def ours_runner(build, batch, opts, cfg, lr, weight_decay, impl):
    from .engines import make_engine
    if cfg.engine != "eager":
        _single_process_env()
    engine = make_engine(cfg)
    state = init_state(build, AdamW(beta2=0.95, eps=1e-8, weight_decay=weight_decay, impl=impl), seed=0, lr=lr,
                       options=opts)
    holder = {"state": engine.init(state)}
    micro = [batch]

    def step():
        holder["state"], _ = engine.step(holder["state"], micro)
    return step, lambda: [*holder["state"].params.values(), *_leaves(holder["state"].opt_state)], engine


def _leaves(tree):
    from .tree import tree_leaves
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


# -- measuring ------------------------------------------------------------------------------------------

def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def step_peak_bytes(step, device) -> int:
    """The most one call of `step` allocates above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            mem = [e["args"] for e in jsonlib.load(f)["traceEvents"] if e.get("name") == "[memory]"
                   and e["args"].get("Device Type") == 0]
    if not mem:
        return 0
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(m["Total Allocated"] for m in mem) - base


class Timer:
    """Per-step time: CUDA events on a GPU (no host sync inside the timed steps); on CPU `clock`, wall time
    (perf_counter) or the process's CPU time (process_time: on a shared machine the time spent waiting for a core
    is not counted; with one thread it is what an idle machine's wall clock would read)."""

    def __init__(self, device, clock=time.perf_counter):
        self.cuda, self.clock = device.type == "cuda", clock

    def time(self, fn, n):
        if self.cuda:
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for a, b in ev:
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in ev]
        out = []
        for _ in range(n):
            t0 = self.clock()
            fn()
            out.append((self.clock() - t0) * 1e3)
        return out


def _figures(ms, tokens, flops, peak, mem_bytes):
    med = statistics.median(ms)
    return {"ms_per_step": med, "ms_min": min(ms), "ms_max": max(ms), "tokens_per_s": tokens / med * 1e3,
            "mfu": flops / (med / 1e3) / peak if flops else None, "peak_mem_gb": mem_bytes / 1e9}


def main(model="gpt2", n_layer=0, n_head=0, n_embd=0, vocab_size=50304, batch_size=12, seq_len=1024,
         precision="fp32", engine="eager", compile=False, against="", json=False, steps=10, warmup=3, rounds=3,
         ce_chunk=0, sdpa_backend="auto", cuda_graphs=False, optimizer_impl="auto", activation_checkpointing=False,
         device="auto", threads=0, clock="wall", profile=False, profile_steps=10, out_dir="runs/bench", lr=3e-4,
         weight_decay=0.1):
    """Time our step and the `against` peers (comma-separated: module, hf, eager); print a table, or with
    --json one JSON object. --clock=cpu times CPU steps in process CPU time (a shared machine, --threads=1)."""
    if threads:
        torch.set_num_threads(int(threads))
    peers = [p for p in (against.split(",") if isinstance(against, str) else against) if p]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise ConfigError(f"against={bad[0]!r}: peers are {', '.join(PEERS)}")
    if "eager" in peers and engine != "eager":
        raise ConfigError("against=eager: our uncompiled step as a peer needs engine='eager'")
    if "hf" in peers and model == "transformer":
        raise ConfigError("against=hf: GPT2LMHeadModel is a GPT; use --model=gpt2 (or a GPT preset)")
    if cuda_graphs and engine != "eager":
        raise ConfigError(f"cuda_graphs=True: only with engine='eager', not engine={engine!r}")
    dev = pick_device(device)
    if clock not in CLOCKS or (clock == "cpu" and dev.type == "cuda"):
        raise ConfigError(f"clock={clock!r}: 'wall', or 'cpu' (process CPU time, on a CPU device)")
    tick = CLOCKS[clock]
    cfg = Config(name="bench", engine=engine, device=dev.type, precision=precision, compile=bool(compile),
                 batch_size=batch_size, lr=lr, weight_decay=weight_decay, clip_grad=1.0, ce_chunk=ce_chunk,
                 sdpa_backend=sdpa_backend, cuda_graphs=bool(cuda_graphs), optimizer_impl=optimizer_impl)
    opts = StepOptions(precision=precision, clip_grad=1.0, compile=bool(compile), ce_chunk=ce_chunk,
                       sdpa_backend=sdpa_backend, cuda_graphs=bool(cuda_graphs))
    args = model_args(model, n_layer, n_head, n_embd, vocab_size, seq_len, activation_checkpointing)
    build = (lambda: Transformer(**args)) if model == "transformer" else (lambda: GPT(**args))  # noqa: E731
    batch = make_batch(model, batch_size, seq_len, vocab_size, dev)
    tokens = batch_size * seq_len   # per step (a Transformer step: target tokens)
    with torch.device("meta"):   # shapes only: no memory for a second copy of a large model
        flops = perf.step_flops(build(), batch)
    peak, peak_src = perf.peak_flops(str(dev), precision, clock=tick)

    ours_step, ours_tensors, eng = ours_runner(build, batch, opts, cfg, lr, weight_decay, optimizer_impl)
    runners = {"ours": (ours_step, ours_tensors)}
    for p in peers:
        if p == "module":
            runners[p] = module_runner(build, batch, opts, optimizer_impl, dev, lr, weight_decay)
        elif p == "eager":   # our own step uncompiled: compile's gain, measured alongside
            plain = attrs.evolve(cfg, compile=False, cuda_graphs=False)
            fn, tensors, _ = ours_runner(build, batch, attrs.evolve(opts, compile=False, cuda_graphs=False), plain,
                                         lr, weight_decay, optimizer_impl)
            runners[p] = fn, tensors
        else:
            runners[p] = hf_runner(args, batch, opts, optimizer_impl, dev, lr, weight_decay)
    try:
        timer = Timer(dev, tick)
        for name, (fn, _) in runners.items():
            timer.time(fn, warmup)
        ms = {name: [] for name in runners}
        per_round = {name: [] for name in runners}
        for _ in range(rounds):
            for name, (fn, _) in runners.items():
                t = timer.time(fn, steps)
                ms[name] += t
                per_round[name].append(statistics.median(t))
        mem = {name: step_peak_bytes(fn, dev) + _nbytes(tensors()) for name, (fn, tensors) in runners.items()}
        summary = None
        if profile:
            say = lambda s: print(s, file=sys.stderr)  # noqa: E731   (stdout may be the JSON object)
            with Profiler(os.path.join(out_dir, "profile"), profile_steps, skip=0, log=say) as prof:
                for _ in range(profile_steps + 1):
                    ours_step()
                    prof.step()
            summary = prof.summary
    finally:
        if hasattr(eng, "close"):
            eng.close()

    res = {"model": model, "engine": engine, "device": dev.type, "clock": clock, "precision": precision,
           "compile": bool(compile), "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": tokens, "flops_per_step": flops,
           "peak_flops": peak, "peak_flops_source": peak_src, "threads": torch.get_num_threads(),
           "switches": {"ce_chunk": ce_chunk, "sdpa_backend": sdpa_backend, "cuda_graphs": bool(cuda_graphs),
                        "optimizer_impl": optimizer_impl, "activation_checkpointing": bool(activation_checkpointing)},
           "steps": steps, "rounds": rounds, **{k: v for k, v in args.items() if k in (
               "n_layer", "n_head", "n_embd", "vocab_size", "num_encoder_layers", "d_model", "num_heads")},
           **_figures(ms["ours"], tokens, flops, peak, mem["ours"]), "against": {}}
    for p in peers:
        fig = _figures(ms[p], tokens, flops, peak, mem[p])
        rr = [b / a for a, b in zip(per_round["ours"], per_round[p])]
        res["against"][p] = {**fig, "ratio": fig["ms_per_step"] / res["ms_per_step"],
                             "ratio_rounds": [min(rr), max(rr)]}
    if summary is not None:
        res["profile"] = os.path.join(out_dir, "profile")
    if json:
        print(jsonlib.dumps(res))
    else:
        print(format_table(res))
    return res


def format_table(r: dict) -> str:
    shape = (f"{r.get('n_layer', r.get('num_encoder_layers'))} layers, {r.get('n_embd', r.get('d_model'))} wide, "
             f"vocab {r.get('vocab_size', '')}")
    sw = ", ".join(f"{k}={v}" for k, v in r["switches"].items())
    lines = [f"{r['model']} ({shape}) batch {r['batch_size']}x{r['seq_len']} | {r['precision']} | engine "
             f"{r['engine']} | compile={r['compile']} | {r['device']} x{r['threads']} threads | {r['clock']} clock",
             f"switches: {sw}",
             f"FLOPs/step {r['flops_per_step'] / 1e9:.3g} G | peak {r['peak_flops'] / 1e12:.3g} TFLOP/s "
             f"({r['peak_flops_source']})",
             f"{'':8s} {'ms/step':>9s} {'min':>9s} {'max':>9s} {'tokens/s':>10s} {'MFU':>7s} {'peak GB':>8s} "
             f"{'ours/them':>10s}"]
    rows = [("ours", r)] + list(r["against"].items())
    for name, f in rows:
        mfu = f"{f['mfu']:.1%}" if f["mfu"] is not None else "-"
        ratio = f"{f['ratio']:.3f}x" if "ratio" in f else ""
        lines.append(f"{name:8s} {f['ms_per_step']:9.2f} {f['ms_min']:9.2f} {f['ms_max']:9.2f} "
                     f"{f['tokens_per_s']:10.0f} {mfu:>7s} {f['peak_mem_gb']:8.3f} {ratio:>10s}")
    return "\n".join(lines)
