"""torch.profiler on any run (`--profile=True --profile_steps=N`) and on `th.py bench`, and the summary of a trace.

A run skips its first step (compilation, allocator warm-up), warms the profiler up for one, records `steps`, and
writes under `<run dir>/profile/`:

    tb/<host>_<pid>.<ts>.pt.trace.json   TensorBoard's profiler plugin layout (`tensorboard --logdir .../profile/tb`)
    trace.json                           the same trace as Chrome trace JSON (chrome://tracing, ui.perfetto.dev)
    summary.json                         the summary, also printed

The summary is computed from the trace itself: top ops by self time; compute and communication time (the union
of their intervals: GPU kernels on CUDA, NCCL kernels being communication; on CPU the ops on every thread, with
gloo / c10d collectives as communication and ops enclosing one left out of compute); the fraction of communication time that overlapped compute; the time the
loop waited for the data loader (`data_wait` ranges); and the peak of the allocator's total (CPU and CUDA), which
shows what activation checkpointing saves.
"""
import contextlib
import json
import os
import re
import shutil
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, record_function

COMM = re.compile(r"nccl|gloo|c10d::|all_?reduce|all_?gather|reduce_?scatter|broadcast|all_?to_?all", re.I)
MARKERS = ("data_wait",)
DATA_WAIT = "data_wait"


def data_wait():
    """The range the loop spends getting the next batch (the summary's data-loader wait)."""
    return record_function(DATA_WAIT)


@contextlib.contextmanager
def quiet_native_stderr():
    """Kineto (torch.profiler's C++ side) prints `USDT: ... profiler_start/stop` lines on the process's stderr
    whatever its log level; they are not ours to show. File descriptor 2 goes to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class Profiler:
    """`with Profiler(dir, steps) as prof:` ... `prof.step()` after each training step. Disabled: does nothing."""

    def __init__(self, out_dir: str, steps: int = 10, skip: int = 1, enabled: bool = True, log=print):
        self.out_dir, self.enabled, self.log = out_dir, enabled, log
        self.summary = None
        if enabled:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(
                activities=activities, profile_memory=True, on_trace_ready=self._ready,
                schedule=torch.profiler.schedule(wait=skip, warmup=1, active=steps, repeat=1))

    def __enter__(self):
        if self.enabled:
            with quiet_native_stderr():
                self.prof.start()
        return self

    def step(self):
        if self.enabled and self.summary is None:
            with quiet_native_stderr():   # the schedule starts and stops kineto inside step()
                self.prof.step()
            self._say_summary()

    def __exit__(self, *exc):
        if self.enabled:
            with quiet_native_stderr():
                self.prof.stop()   # a run shorter than the window: whatever was recorded is written now
            self._say_summary()
            if self.summary is None and exc[0] is None:
                self.log("profile: the run ended before any step was recorded (more steps, or profile_steps)")

    def _ready(self, prof):
        tb = os.path.join(self.out_dir, "tb")
        os.makedirs(tb, exist_ok=True)
        torch.profiler.tensorboard_trace_handler(tb)(prof)   # a trace can be exported once: copy it
        written = max((os.path.join(tb, f) for f in os.listdir(tb) if f.endswith(".pt.trace.json")),
                      key=os.path.getmtime)
        trace = os.path.join(self.out_dir, "trace.json")
        shutil.copyfile(written, trace)
        self.summary = summarize(trace, prof)
        with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=1)
        self._pending = format_summary(self.summary, self.out_dir)   # said once stderr is back

    def _say_summary(self):
        if getattr(self, "_pending", None):
            text, self._pending = self._pending, None
            self.log(text)


def _union(intervals):
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _length(merged) -> float:
    return sum(e - s for s, e in merged)


def _intersection(a, b) -> float:
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _compute_spans(ops, comm):
    """Op intervals that are compute: not a collective and not enclosing one on the same thread (an op that
    launched or waited for a collective would otherwise count its wait as compute)."""
    comm_by_thread = defaultdict(list)
    for c in comm:
        comm_by_thread[(c["pid"], c["tid"])].append((c["ts"], c["ts"] + c["dur"]))
    out = []
    for e in ops:
        if COMM.search(e["name"]):
            continue
        lo, hi = e["ts"], e["ts"] + e["dur"]
        if not any(lo <= s and t <= hi for s, t in comm_by_thread.get((e["pid"], e["tid"]), ())):
            out.append((lo, hi))
    return out


def summarize(trace_path: str, prof=None, top: int = 10) -> dict:
    """The summary of a Chrome trace written by torch.profiler (and `prof`'s op table for the top ops)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in spans if e["name"].startswith("ProfilerStep#")]
    kernels = [e for e in spans if e.get("cat") == "kernel"]
    if kernels:   # CUDA: what the GPU ran
        comm = [e for e in kernels if COMM.search(e["name"])]
        compute = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if not COMM.search(e["name"])]
    else:         # CPU: ops on every thread (the union of nested ops is that of the outermost)
        ops = [e for e in spans if e.get("cat") in ("cpu_op", "user_annotation") and e["name"] not in MARKERS
               and not e["name"].startswith("ProfilerStep#")]
        comm = [e for e in ops if COMM.search(e["name"])]
        compute = _compute_spans(ops, comm)
    comm_u = _union([(e["ts"], e["ts"] + e["dur"]) for e in comm])
    compute_u = _union(compute)
    comm_s = _length(comm_u) / 1e6
    peak = {}
    for e in events:
        if e.get("name") == "[memory]":
            dev = "cuda" if e["args"].get("Device Type") == 1 else "cpu"
            peak[dev] = max(peak.get(dev, 0), e["args"].get("Total Allocated", 0))
    step_s = sum(e["dur"] for e in steps) / 1e6
    wait_s = sum(e["dur"] for e in spans if e["name"] == DATA_WAIT) / 1e6
    out = {
        "steps": len(steps),
        "step_time_s": step_s,
        "compute_s": _length(compute_u) / 1e6,
        "comm_s": comm_s,
        "comm_overlap": _intersection(comm_u, compute_u) / 1e6 / comm_s if comm_s else None,
        "data_wait_s": wait_s,
        "data_wait_fraction": wait_s / step_s if step_s else None,
        "peak_mem_gb": {k: v / 1e9 for k, v in peak.items()},
        "device": "cuda" if kernels else "cpu",
        "top_ops": [],
    }
    if prof is not None:
        key = "self_device_time_total" if kernels else "self_cpu_time_total"
        avgs = sorted((a for a in prof.key_averages() if not a.key.startswith("ProfilerStep")),
                      key=lambda a: getattr(a, key), reverse=True)   # a step's own time is Python, not an op
        total = sum(getattr(a, key) for a in avgs) or 1.0
        out["top_ops"] = [{"name": a.key, "self_ms": getattr(a, key) / 1e3, "share": getattr(a, key) / total,
                           "calls": a.count} for a in avgs[:top]]
    return out


def format_summary(s: dict, where: str = "") -> str:
    lines = [f"profile ({s['steps']} steps, {s['device']}){': ' + where if where else ''}"]
    lines.append(f"  step time {s['step_time_s'] * 1e3:.1f} ms total | compute {s['compute_s'] * 1e3:.1f} ms | "
                 f"communication {s['comm_s'] * 1e3:.1f} ms" +
                 (f" ({s['comm_overlap']:.0%} overlapped with compute)" if s["comm_overlap"] is not None else ""))
    if s["data_wait_fraction"] is not None:
        lines.append(f"  waiting for data {s['data_wait_s'] * 1e3:.1f} ms ({s['data_wait_fraction']:.1%} of the steps)")
    lines.append("  peak allocated " + ", ".join(f"{k} {v:.3f} GB" for k, v in s["peak_mem_gb"].items()))
    for op in s["top_ops"]:
        lines.append(f"  {op['self_ms']:10.2f} ms {op['share']:6.1%} {op['calls']:6d}x  {op['name']}")
    return "\n".join(lines)
