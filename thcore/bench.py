"""`th.py bench`: ms/step, tokens/s, MFU and peak memory of our training step, against peers in the same process.

    python th.py bench --model=gpt2 --n_layer=12 --n_head=12 --n_embd=768 --batch_size=12 --seq_len=1024 \
        --precision=bf16 [--engine=eager|ddp|fsdp|deepspeed] [--compile=True] [--against=module,hf] [--json]

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
import contextlib
import json as jsonlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import attrs
import torch
import torch.nn.functional as F

from . import perf
from .config import Config, ConfigError, field, from_dict
from .func import pick_device
from .models import GPT_PRESETS, GPTConfig, TransformerConfig
from .optim import AdamW, _groups, _impl
from .profiler import Profiler, quiet_native_stderr
from .remat import checkpoint_blocks
from .state import StepOptions, init_state
from .step import IGNORE, autocast, sdpa_backend
from .tasks import Task

PEERS = ("module", "hf", "eager")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# -- models and batches ---------------------------------------------------------------------------------

def model_config(model, n_layer, n_head, n_embd, vocab_size, seq_len) -> GPTConfig | TransformerConfig:
    """The benchmarked model: a GPT preset or the Transformer, n_layer / n_head / n_embd overriding (0: keep)."""
    if model == "transformer":
        n_layer, n_head, n_embd = n_layer or 6, n_head or 8, n_embd or 512
        return TransformerConfig(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, d_model=n_embd,
                                 num_heads=n_head, num_encoder_layers=n_layer, num_decoder_layers=n_layer,
                                 d_ff=4 * n_embd, dropout=0.0, max_len=seq_len + 1)
    if model not in GPT_PRESETS:
        raise ConfigError(f"model={model!r}: one of {', '.join([*GPT_PRESETS, 'transformer'])}")
    shape = {k: v for k, v in dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd).items() if v}
    return GPTConfig.preset(model, vocab_size=vocab_size, block_size=seq_len, dropout=0.0, bias=True, **shape)


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


def hf_runner(config, batch, opts, impl, device, lr, weight_decay):
    """transformers' GPT2LMHeadModel with sdpa attention, trained as its users do (loss from `labels`)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ConfigError("against=hf: transformers is not installed (pip install transformers)") from None
    cfg = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                     n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
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


class _DeepSpeedOwnsIt:
    """DeepSpeed creates and keeps the optimizer state: no AdamW moments on the host beforehand (2 x fp32 params,
    43 GB at 5.4B, that the engine would drop)."""

    def init(self, params: dict) -> dict:
        return {}


def _optimizer(cfg, weight_decay, impl):
    if cfg.engine == "deepspeed":
        return _DeepSpeedOwnsIt()
    return AdamW(beta2=0.95, eps=1e-8, weight_decay=weight_decay, impl=impl)


def ours_runner(build, batch, opts, cfg, lr, weight_decay, impl):
    from .engines import make_engine
    if cfg.engine != "eager":
        _single_process_env()
    engine = make_engine(cfg)
    state = init_state(build, _optimizer(cfg, weight_decay, impl), seed=0, lr=lr, options=opts,
                       device=engine.build_device)
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
    with quiet_native_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       profile_memory=True) as prof:
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


def _choice(*allowed):
    def check(inst, attr, value):
        if value not in allowed:
            raise ConfigError(f"{attr.name}={value!r}: must be one of {', '.join(map(repr, allowed))}")
    return check


def _at_least(n):
    def check(inst, attr, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < n:
            raise ConfigError(f"{attr.name}={value!r}: must be a number >= {n}")
    return check


@attrs.define(kw_only=True)
class BenchConfig:
    """The flags of `th.py bench`: what `th.py bench --help` lists and `main` validates."""
    model: str = field("gpt2", "a GPT preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or transformer (enc-dec)",
                       "model", _choice(*GPT_PRESETS, "transformer"))
    n_layer: int = field(0, "layers (0 = the preset's; transformer: 6)", "model", _at_least(0))
    n_head: int = field(0, "attention heads (0 = the preset's; transformer: 8)", "model", _at_least(0))
    n_embd: int = field(0, "model width (0 = the preset's; transformer: 512)", "model", _at_least(0))
    vocab_size: int = field(50304, "vocabulary (50304: GPT-2's 50257 padded to a multiple of 64)", "model",
                            _at_least(2))
    activation_checkpointing: bool = field(False, "recompute each block in the backward", "model")
    batch_size: int = field(12, "sequences per step", "data", _at_least(1))
    seq_len: int = field(1024, "tokens per sequence", "data", _at_least(1))
    lr: float = field(3e-4, "AdamW learning rate (betas 0.9, 0.95)", "optimisation", _at_least(0))
    weight_decay: float = field(0.1, "AdamW weight decay on matrices", "optimisation", _at_least(0))
    optimizer_impl: str = field("auto", "AdamW kernel: auto (fused on CUDA) | fused | foreach | for_loop",
                                "optimisation", _choice("auto", "fused", "foreach", "for_loop"))
    precision: str = field("fp32", "fp32 (TF32 matmuls on a GPU) | bf16 | fp16", "precision/speed",
                           _choice("fp32", "bf16", "fp16"))
    compile: bool = field(False, "torch.compile the step (peers too)", "precision/speed")
    ce_chunk: int = field(0, "> 0: output layer + loss fused, this many tokens at a time", "precision/speed",
                          _at_least(0))
    sdpa_backend: str = field("auto", "attention kernel tried first: auto | flash | efficient | cudnn | math",
                              "precision/speed", _choice("auto", "flash", "efficient", "cudnn", "math"))
    cuda_graphs: bool = field(False, "compile with CUDA graphs (engine=eager)", "precision/speed")
    device: str = field("auto", "auto | cpu | cuda", "engine/distribution", _choice("auto", "cpu", "cuda"))
    threads: int = field(0, "CPU threads (0 = torch's default)", "engine/distribution", _at_least(0))
    engine: str = field("eager", "eager | ddp | fsdp | deepspeed (one process: a real reducer / FSDP2 / DeepSpeed "
                                 "engine)", "engine/distribution", _choice("eager", "ddp", "fsdp", "deepspeed"))
    zero_stage: int = field(0, "DeepSpeed ZeRO stage 0-3 (engine=deepspeed)", "engine/distribution",
                            _choice(0, 1, 2, 3))
    offload: str = field("none", "offload: none | cpu | nvme (engine=deepspeed; fsdp: cpu)", "engine/distribution",
                         _choice("none", "cpu", "nvme"))
    against: str = field("", "peers, comma-separated: module (the nn.Module + torch.optim loop), hf "
                             "(GPT2LMHeadModel), eager (our step uncompiled)", "logging/eval")
    loop: bool = field(False, "time the real fit loop (data, accounting, logging) instead of the step alone",
                       "logging/eval")
    suite: str = field("", "gpu: every GPU figure, each case in its own process (toy sizes without a GPU)",
                       "logging/eval", _choice("", "gpu"))
    steps: int = field(10, "timed steps per round", "logging/eval", _at_least(1))
    warmup: int = field(3, "untimed steps first (compilation, allocator)", "logging/eval", _at_least(0))
    rounds: int = field(3, "rounds; the runners take turns each round", "logging/eval", _at_least(1))
    clock: str = field("wall", "wall, or cpu (process CPU time, on a CPU device)", "logging/eval",
                       _choice("wall", "cpu"))
    json: bool = field(False, "print one JSON object instead of the table", "logging/eval")
    profile: bool = field(False, "torch.profiler trace + summary of our step under out_dir/profile",
                          "logging/eval")
    profile_steps: int = field(10, "steps the profiler records", "logging/eval", _at_least(1))
    out_dir: str = field("runs/bench", "where profiles, loop runs and the suite's JSON go", "logging/eval")

    def validate(self):
        peers = self.peers
        bad = [p for p in peers if p not in PEERS]
        if bad:
            raise ConfigError(f"against={bad[0]!r}: peers are {', '.join(PEERS)}")
        if "eager" in peers and self.engine != "eager":
            raise ConfigError("against=eager: our uncompiled step as a peer needs engine='eager'")
        if "hf" in peers and self.model == "transformer":
            raise ConfigError("against=hf: GPT2LMHeadModel is a GPT; use --model=gpt2 (or a GPT preset)")
        if self.cuda_graphs and self.engine != "eager":
            raise ConfigError(f"cuda_graphs=True: only with engine='eager', not engine={self.engine!r}")
        if self.engine != "deepspeed" and self.zero_stage:
            raise ConfigError(f"zero_stage={self.zero_stage}, offload={self.offload!r}: only with engine='deepspeed'")
        if self.offload != "none" and not (self.engine == "deepspeed" or self.engine == "fsdp" and self.offload == "cpu"):
            raise ConfigError(f"offload={self.offload!r}: only with engine='deepspeed', or 'cpu' with engine='fsdp'")
        if self.loop and peers:
            raise ConfigError("loop=True: times our fit loop alone; drop --against")

    @property
    def peers(self) -> list:
        return [p for p in self.against.split(",") if p]


def main(**kwargs):
    """Time our step and the `against` peers; print a table, or with --json one JSON object. Every flag is a
    BenchConfig field: an unknown or bad one is a ConfigError naming it."""
    if isinstance(kwargs.get("against"), (list, tuple)):   # fire reads --against=module,hf as a tuple
        kwargs["against"] = ",".join(map(str, kwargs["against"]))
    cfg = from_dict(BenchConfig, kwargs)
    cfg.validate()
    with _stdout_to_stderr() if cfg.json else contextlib.nullcontext():   # DeepSpeed talks on stdout
        res = run_suite(cfg) if cfg.suite else bench(cfg)
    print(jsonlib.dumps(res) if cfg.json else format_suite(res) if cfg.suite else format_table(res))
    return res


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 onto 2 meanwhile (libraries that print, at the C level too): with --json, stdout is
    exactly the one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _run_config(b: BenchConfig, dev, **kw) -> Config:
    """The run config our engines read, with the bench's optimizer (AdamW 0.9/0.95, eps 1e-8)."""
    return Config(name="bench", engine=b.engine, device=dev.type, precision=b.precision, compile=b.compile,
                  batch_size=b.batch_size, lr=b.lr, weight_decay=b.weight_decay, clip_grad=1.0, beta2=0.95,
                  eps=1e-8, ce_chunk=b.ce_chunk, sdpa_backend=b.sdpa_backend, cuda_graphs=b.cuda_graphs,
                  optimizer_impl=b.optimizer_impl, zero_stage=b.zero_stage, offload=b.offload,
                  activation_checkpointing=b.activation_checkpointing, **kw)


def bench(b: BenchConfig) -> dict:
    if b.threads:
        torch.set_num_threads(int(b.threads))
    peers = b.peers
    dev = pick_device(b.device)
    if b.clock == "cpu" and dev.type == "cuda":
        raise ConfigError(f"clock={b.clock!r}: 'wall', or 'cpu' (process CPU time, on a CPU device)")
    tick = CLOCKS[b.clock]
    cfg = _run_config(b, dev)
    opts = StepOptions(precision=b.precision, clip_grad=1.0, compile=b.compile, ce_chunk=b.ce_chunk,
                       sdpa_backend=b.sdpa_backend, cuda_graphs=b.cuda_graphs)
    shape = model_config(b.model, b.n_layer, b.n_head, b.n_embd, b.vocab_size, b.seq_len)

    def build():
        model = shape.build()
        return checkpoint_blocks(model) if b.activation_checkpointing else model
    batch = make_batch(b.model, b.batch_size, b.seq_len, b.vocab_size, dev)
    tokens = b.batch_size * b.seq_len   # per step (a Transformer step: target tokens)
    flops = shape.step_flops(batch)   # the config's formula: no model built
    if b.engine == "eager" or dev.type == "cuda":
        from .engines import use_tf32
        use_tf32(dev)   # what our engines do on a GPU; the peers in this process run with it too
    peak, peak_src = perf.peak_flops(str(dev), b.precision, clock=tick)
    if b.loop:
        ms = loop_times(b, cfg, build, batch)
        res = _result(b, dev, shape, tokens, flops, peak, peak_src)
        res.update(_figures(ms, tokens, flops, peak, 0), loop=True, against={})
        res["peak_mem_gb"] = None
        return _report(b, res, dev)

    ours_step, ours_tensors, eng = ours_runner(build, batch, opts, cfg, b.lr, b.weight_decay, b.optimizer_impl)
    runners = {"ours": (ours_step, ours_tensors)}
    for p in peers:
        if p == "module":
            runners[p] = module_runner(build, batch, opts, b.optimizer_impl, dev, b.lr, b.weight_decay)
        elif p == "eager":   # our own step uncompiled: compile's gain, measured alongside
            plain = attrs.evolve(cfg, compile=False, cuda_graphs=False)
            fn, tensors, _ = ours_runner(build, batch, attrs.evolve(opts, compile=False, cuda_graphs=False), plain,
                                         b.lr, b.weight_decay, b.optimizer_impl)
            runners[p] = fn, tensors
        else:
            runners[p] = hf_runner(shape, batch, opts, b.optimizer_impl, dev, b.lr, b.weight_decay)
    try:
        timer = Timer(dev, tick)
        for name, (fn, _) in runners.items():
            timer.time(fn, b.warmup)
        ms = {name: [] for name in runners}
        per_round = {name: [] for name in runners}
        for _ in range(b.rounds):
            for name, (fn, _) in runners.items():
                t = timer.time(fn, b.steps)
                ms[name] += t
                per_round[name].append(statistics.median(t))
        mem = {name: step_peak_bytes(fn, dev) + _nbytes(tensors()) for name, (fn, tensors) in runners.items()}
        summary = None
        if b.profile:
            say = lambda s: print(s, file=sys.stderr)  # noqa: E731   (stdout may be the JSON object)
            with Profiler(os.path.join(b.out_dir, "profile"), b.profile_steps, skip=0, log=say) as prof:
                for _ in range(b.profile_steps + 1):
                    ours_step()
                    prof.step()
            summary = prof.summary
    finally:
        if hasattr(eng, "close"):
            eng.close()

    res = _result(b, dev, shape, tokens, flops, peak, peak_src)
    res.update(_figures(ms["ours"], tokens, flops, peak, mem["ours"]), against={})
    for p in peers:
        fig = _figures(ms[p], tokens, flops, peak, mem[p])
        rr = [y / x for x, y in zip(per_round["ours"], per_round[p])]
        res["against"][p] = {**fig, "ratio": fig["ms_per_step"] / res["ms_per_step"],
                             "ratio_rounds": [min(rr), max(rr)]}
    if summary is not None:
        res["profile"] = os.path.join(b.out_dir, "profile")
    return _report(b, res, dev)


def _result(b, dev, shape, tokens, flops, peak, peak_src) -> dict:
    return {"model": b.model, "engine": b.engine, "zero_stage": b.zero_stage, "offload": b.offload,
            "device": dev.type, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "clock": b.clock, "precision": b.precision, "compile": b.compile, "batch_size": b.batch_size,
            "seq_len": b.seq_len, "tokens_per_step": tokens, "flops_per_step": flops, "peak_flops": peak,
            "peak_flops_source": peak_src, "threads": torch.get_num_threads(),
            "switches": {"ce_chunk": b.ce_chunk, "sdpa_backend": b.sdpa_backend, "cuda_graphs": b.cuda_graphs,
                         "optimizer_impl": b.optimizer_impl, "activation_checkpointing": b.activation_checkpointing},
            "steps": b.steps, "rounds": b.rounds, "loop": False,
            **{k: v for k, v in shape.items() if k in ("n_layer", "n_head", "n_embd", "vocab_size",
                                                      "num_encoder_layers", "d_model", "num_heads")}}


def _report(b, res, dev) -> dict:
    # the process-wide peaks: one bench per process (the suite) makes them this configuration's own
    res["process_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    res["host_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # Linux: KiB
    res["pid"] = os.getpid()
    return res


# -- --loop: the fit loop itself ------------------------------------------------------------------------

class _SyntheticTask(Task):
    """The smallest task the fit loop runs: the bench's model and one fixed batch, no evaluation."""

    def __init__(self, build, batch, cfg):
        self.build, self.batch, self.cfg = build, batch, cfg
        self.summary = "bench: one synthetic batch, repeated"

    def batches_per_epoch(self, world: int) -> int:
        return 1_000_000

    def init_state(self, total_steps: int, device="cpu"):
        return init_state(self.build, _optimizer(self.cfg, self.cfg.weight_decay, self.cfg.optimizer_impl),
                          seed=0, lr=self.cfg.lr, device=device, options=StepOptions(
                              precision=self.cfg.precision, clip_grad=1.0, compile=self.cfg.compile,
                              ce_chunk=self.cfg.ce_chunk, sdpa_backend=self.cfg.sdpa_backend,
                              cuda_graphs=self.cfg.cuda_graphs))

    def train_loader(self, epoch, start, engine):
        cpu = {k: v.cpu() for k, v in self.batch.items()}   # from the host, as a real loader's batches
        while True:
            yield cpu


def loop_times(b: BenchConfig, cfg, build, batch) -> list:
    """ms per step of `fit` (the loop th.py run runs) over rounds x steps steps after one window of warm-up,
    from its own log lines (log_every = steps: each line times `steps` steps, eval and checkpoints apart)."""
    from .engines import make_engine
    from .loop import fit
    from .metrics import read_jsonl
    if b.engine != "eager":
        _single_process_env()
    with tempfile.TemporaryDirectory() as d:
        run = attrs.evolve(cfg, name="bench-loop", out_dir=d, resume="never", lr_schedule="constant",
                           max_steps=b.steps * (b.rounds + 1), log_every=b.steps, eval_every=0, checkpoint_every=0)
        engine = make_engine(run)
        try:   # the loop's own lines go to stderr: stdout may be the JSON object
            with contextlib.redirect_stdout(sys.stderr):
                fit(run, _SyntheticTask(build, batch, run), engine)
        finally:
            engine.close()
        rows = [r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if r["split"] == "train"]
    tokens = b.batch_size * b.seq_len
    return [tokens / r["tokens_per_s"] * 1e3 for r in rows[1:]]   # the first window warms up


# -- --suite=gpu: every GPU figure of the project, each case in its own process ----------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GPT2 = dict(model="gpt2", batch_size=12, seq_len=1024, precision="bf16")
_XL = dict(model="gpt2-xl", batch_size=8, seq_len=1024, precision="bf16")
# 5.4B parameters (12 L d^2 + embeddings): 26 layers 4096 wide, the largest that fits a 128 GB host under
# ZeRO-3 + CPU offload, which keeps 22 bytes a parameter there (docs/DEEPSPEED.md): 120 GB
_6B = dict(model="gpt2", n_layer=26, n_head=32, n_embd=4096, batch_size=1, seq_len=1024, precision="bf16")
# (name, flags on a GPU, goal: (kind, value, baseline case)); kind: ratio (over the peer or the baseline case),
# tokens_per_s, or runs (it trains). On a CPU every case runs at toy size (TOY) uncompiled.
SUITE = [
    ("gpt2-124m compiled vs module", {**_GPT2, "compile": True, "against": "module"}, ("ratio", 1.25, None)),
    ("gpt2-124m fit loop", {**_GPT2, "compile": True, "loop": True}, ("ratio", 0.98, "gpt2-124m compiled vs module")),
    ("gpt2-124m ddp, 1 GPU", {**_GPT2, "compile": True, "engine": "ddp"},
     ("ratio", 0.98, "gpt2-124m compiled vs module")),
    # does activation checkpointing save memory inside one compiled graph (recompute tags)? peak / the case above
    ("gpt2-124m compiled + ckpt", {**_GPT2, "compile": True, "activation_checkpointing": True},
     ("memory", 0.9, "gpt2-124m compiled vs module")),
    ("gpt2-xl eager", {**_XL}, ("tokens_per_s", 45_000, None)),
    ("gpt2-xl zero-2, 1 GPU", {**_XL, "engine": "deepspeed", "zero_stage": 2}, ("ratio", 0.95, "gpt2-xl eager")),
    ("gpt2-xl fsdp, 1 GPU", {**_XL, "engine": "fsdp"}, ("ratio", 0.95, "gpt2-xl eager")),
    ("5.4B zero-3 + cpu offload + ckpt", {**_6B, "engine": "deepspeed", "zero_stage": 3, "offload": "cpu",
                                          "activation_checkpointing": True, "steps": 2, "rounds": 1, "warmup": 1},
     ("runs", None, None)),
]
TOY = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=128, batch_size=2, seq_len=32, precision="fp32",
           compile=False, steps=2, rounds=1, warmup=1, threads=1)
SUITE_TIMEOUT_S = 600   # per case


def _suite_flags(b: BenchConfig, flags: dict, gpu: bool) -> dict:
    flags = {"steps": b.steps, "rounds": b.rounds, "warmup": b.warmup, **flags}
    if not gpu:
        flags = {**flags, **TOY, "model": "gpt2", "device": "cpu"}
    return flags


def _case(name: str, flags: dict, out_dir: str) -> dict:
    """One `th.py bench ... --json` in a process of its own: nothing of another case stays resident."""
    cmd = [sys.executable, os.path.join(ROOT, "th.py"), "bench", *(f"--{k}={v}" for k, v in flags.items()), "--json",
           f"--out_dir={os.path.join(out_dir, name.replace(' ', '_').replace(',', ''))}"]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"case": name, "flags": flags, "error": f"timed out after {SUITE_TIMEOUT_S} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        return {"case": name, "flags": flags, "error": why[:300], "wall_s": wall}
    return {"case": name, "flags": flags, "wall_s": wall, **jsonlib.loads(lines[-1])}


def _gpu_tests(out_dir: str) -> dict:
    """The `gpu`-marked tests, in a process of their own."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        os.path.join(ROOT, "tests")], capture_output=True, text=True, timeout=SUITE_TIMEOUT_S,
                       cwd=ROOT)
    last = (p.stdout.strip().splitlines() or ["no output"])[-1]
    return {"case": "gpu-marked tests", "summary": last, "returncode": p.returncode,
            "wall_s": time.perf_counter() - t0}


def _verdict(case: dict, by_name: dict):
    kind, goal, base = case["goal"]
    if "error" in case:
        return None, "failed"
    if kind == "runs":
        return None, "trains"
    if kind == "tokens_per_s":
        return None, "met" if case["tokens_per_s"] >= goal else "missed"
    if kind == "memory":   # the case's peak over the baseline's: < goal = it saves memory
        ref = by_name.get(base, {})
        peak = [c.get("process_peak_gb") or c.get("host_peak_rss_gb") for c in (case, ref)]
        if not all(peak):
            return None, "no baseline"
        return peak[0] / peak[1], "met" if peak[0] / peak[1] < goal else "missed"
    if base is None:
        ratio = case["against"]["module"]["ratio"]
    else:
        ref = by_name.get(base, {})
        if "tokens_per_s" not in ref:
            return None, "no baseline"
        ratio = case["tokens_per_s"] / ref["tokens_per_s"]
    return ratio, "met" if ratio >= goal else "missed"


def run_suite(b: BenchConfig) -> dict:
    """Every GPU figure in one command: GPT-2 124M compiled against the compiled module loop, the fit loop and
    DDP on one GPU against that step, GPT-2 XL eager and under ZeRO-2, a 5.4B GPT under ZeRO-3 + CPU offload +
    activation checkpointing, and the gpu-marked tests; each in its own process. Without a GPU the same cases
    run at toy size on the CPU (no compile), which is the suite's CI test. One table; one JSON file."""
    dev = pick_device(b.device)
    gpu = dev.type == "cuda"
    os.makedirs(b.out_dir, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t0 = time.perf_counter()
    cases, by_name = [], {}
    for name, flags, goal in SUITE:
        case = {**_case(name, _suite_flags(b, flags, gpu), b.out_dir), "goal": goal}
        case["ratio"], case["verdict"] = _verdict(case, by_name)
        by_name[name] = case
        cases.append(case)
        print(f"suite: {name}: {case['verdict']} ({case.get('wall_s', 0):.0f} s)", file=sys.stderr)
    tests = _gpu_tests(b.out_dir) if gpu else {"case": "gpu-marked tests", "summary": "not run: no GPU"}
    res = {"suite": "gpu", "started": started, "wall_s": time.perf_counter() - t0, "toy": not gpu,
           "device": torch.cuda.get_device_name(dev) if gpu else "cpu", "torch": torch.__version__,
           "cases": cases, "tests": tests}
    path = os.path.join(b.out_dir, "suite.json")
    with open(path, "w") as f:
        jsonlib.dump(res, f, indent=1)
    res["json_path"] = path
    return res


def format_suite(r: dict) -> str:
    lines = [f"bench suite ({'toy sizes on CPU: no GPU' if r['toy'] else r['device']}, torch {r['torch']}, "
             f"{r['started']}, {r['wall_s']:.0f} s)",
             f"{'case':34s} {'tokens/s':>10s} {'ms/step':>9s} {'MFU':>7s} {'peak GB':>8s} {'ratio':>7s} "
             f"{'goal':>12s}  verdict"]
    for c in r["cases"]:
        kind, goal, base = c["goal"]
        want = {"ratio": f">= {goal}x", "tokens_per_s": f">= {goal or 0:,}", "runs": "trains",
                "memory": f"peak < {goal}x"}[kind]
        if "error" in c:
            lines.append(f"{c['case']:34s} {'-':>10s} {'-':>9s} {'-':>7s} {'-':>8s} {'-':>7s} {want:>12s}  "
                         f"failed: {c['error']}")
            continue
        mfu = f"{c['mfu']:.1%}" if c.get("mfu") is not None else "-"
        peak = c.get("process_peak_gb") if c.get("process_peak_gb") is not None else c.get("host_peak_rss_gb")
        ratio = f"{c['ratio']:.3f}" if c.get("ratio") is not None else "-"
        lines.append(f"{c['case']:34s} {c['tokens_per_s']:10.0f} {c['ms_per_step']:9.2f} {mfu:>7s} "
                     f"{peak:8.2f} {ratio:>7s} {want:>12s}  {c['verdict']}")
    lines.append(f"gpu-marked tests: {r['tests']['summary']}")
    lines.append(f"(peak GB: CUDA allocator peak of the case's process; on CPU its peak RSS) json: {r.get('json_path')}")
    return "\n".join(lines)


def format_table(r: dict) -> str:
    shape = (f"{r.get('n_layer', r.get('num_encoder_layers'))} layers, {r.get('n_embd', r.get('d_model'))} wide, "
             f"vocab {r.get('vocab_size', '')}")
    sw = ", ".join(f"{k}={v}" for k, v in r["switches"].items())
    lines = [f"{r['model']} ({shape}) batch {r['batch_size']}x{r['seq_len']} | {r['precision']} | engine "
             f"{r['engine']}{' ZeRO-%d' % r['zero_stage'] if r['engine'] == 'deepspeed' else ''}"
             f"{' offload ' + r['offload'] if r.get('offload', 'none') != 'none' else ''} | compile={r['compile']} | {r['device']} x{r['threads']} threads | {r['clock']} clock",
             f"switches: {sw}",
             f"FLOPs/step {r['flops_per_step'] / 1e9:.3g} G | peak {r['peak_flops'] / 1e12:.3g} TFLOP/s "
             f"({r['peak_flops_source']})",
             f"{'':8s} {'ms/step':>9s} {'min':>9s} {'max':>9s} {'tokens/s':>10s} {'MFU':>7s} {'peak GB':>8s} "
             f"{'ours/them':>10s}"]
    rows = [("loop" if r.get("loop") else "ours", r)] + list(r["against"].items())
    for name, f in rows:
        mfu = f"{f['mfu']:.1%}" if f["mfu"] is not None else "-"
        ratio = f"{f['ratio']:.3f}x" if "ratio" in f else ""
        mem = f"{f['peak_mem_gb']:8.3f}" if f.get("peak_mem_gb") is not None else f"{'-':>8s}"
        lines.append(f"{name:8s} {f['ms_per_step']:9.2f} {f['ms_min']:9.2f} {f['ms_max']:9.2f} "
                     f"{f['tokens_per_s']:10.0f} {mfu:>7s} {mem} {ratio:>10s}")
    return "\n".join(lines)
