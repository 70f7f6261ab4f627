"""The parts of a fit: each concern of the loop owns its cadence and its state (docs/ARCHITECTURE.md, "The parts").

After every step the loop asks each part its questions (`ask`), sums them over the ranks in one collective and
hands each part its answers (`after_step`). A part saves what it must carry across a resume through
`state_dict()`, merged into the checkpoint's state.json, and reads it back in `start` from `run.meta`.

    start(run)                  the run is restored (run.meta: the checkpoint's state.json, {} on a fresh start)
    ask(run) -> {name: value}   numbers (floats or device tensors) summed over ranks; asked only where the ranks
                                agree (run.agreeing: every step with one process, log steps with several)
    after_step(run, answers)    this part's questions, summed ({} where nothing was asked)
    end(run)                    the loop is over (run.stop says why)
    close(run)                  always, after an error too
    state_dict() -> dict        top-level fields of state.json (keep the names unique)
"""
import contextlib
import itertools
import signal
import time

import attrs
import torch
from tqdm import tqdm

from . import faults, research
from .perf import mfu_fields, step_flops


@attrs.define(eq=False)
class Run:
    """What the loop and its parts share: the fixed facts of the run, the state, and the step just taken."""
    cfg: object
    task: object
    engine: object
    total: int                    # the step the run ends at
    say: object                   # a line for the user (rank 0)
    metrics: object               # metrics.Metrics: metrics.jsonl, TensorBoard, wandb
    state: object                 # the TrainState; parts may replace it (the time budget's lr)
    meta: dict                    # the restored state.json, {} on a fresh start
    plain: bool = False           # a log file rather than a terminal: plain lines, no progress bar
    parts: list = attrs.Factory(list)
    batch: object = None          # the step's data.loader.StepBatch
    out: dict = attrs.Factory(dict)   # the step's metrics from engine.step (device tensors)
    current: int = 0              # the step being run, for error messages
    evaluated: bool = False       # this step ran an evaluation
    improved: bool = False        # ... which found a better val loss
    stop: str | None = None       # why the run ends after this step: done | signal | time | early
    paused_s: float = 0.0         # seconds spent evaluating and saving (kept out of tokens/s)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def log_step(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == self.total

    @property
    def agreeing(self) -> bool:
        return self.engine.world_size == 1 or self.log_step

    @contextlib.contextmanager
    def paused(self):
        """Time that is not training (evaluation, checkpoints): kept out of the throughput figures."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0


class Part:
    """The defaults of the part protocol (module docstring): a part overrides what it needs."""

    def start(self, run: Run) -> None:
        pass

    def ask(self, run: Run) -> dict:
        return {}

    def after_step(self, run: Run, answers: dict) -> None:
        pass

    def end(self, run: Run) -> None:
        pass

    def close(self, run: Run) -> None:
        pass

    def state_dict(self) -> dict:
        return {}


def poll(run: Run, parts: list) -> list[dict]:
    """Every part's questions at this step, summed over the ranks in one collective and read back in one host
    sync; with one process, plain numbers come back as they are (nothing to wait for)."""
    if not run.agreeing:
        return [{} for _ in parts]
    asks = [p.ask(run) for p in parts]
    items = [(i, k, v) for i, a in enumerate(asks) for k, v in a.items()]
    if run.engine.world_size == 1 and not any(torch.is_tensor(v) for _, _, v in items):
        return asks
    sizes = [v.numel() if torch.is_tensor(v) else 1 for _, _, v in items]
    ends = list(itertools.accumulate(sizes))
    buf = torch.empty(sum(sizes), dtype=torch.float64, device=run.engine.device)
    for (_, _, v), end, n in zip(items, ends, sizes):   # written in place: no host-to-device copy, no sync
        buf[end - n:end] = v.reshape(-1) if torch.is_tensor(v) else v
    flat, out = run.engine.reduce_sum(buf).tolist(), [{} for _ in parts]
    for (i, k, v), end, n in zip(items, ends, sizes):
        out[i][k] = flat[end - n:end] if torch.is_tensor(v) and v.dim() else flat[end - 1]
    return out


class Stopper(Part):
    """Max steps and stop requests. The first SIGINT/SIGTERM asks the run to stop after the current step (never
    mid-update: the state is updated in place); a second SIGINT stops at once. Ranks get a signal at different
    steps (or one rank alone gets it): they decide together, since a rank stopping alone would deadlock the
    others' next collective."""

    def __init__(self):
        self.requested, self._old = False, {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def start(self, run):
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        except ValueError:   # not the main thread: no handlers, Ctrl-C behaves as usual
            pass
        if run.step >= run.total:
            run.stop = "done"

    def ask(self, run):
        return {"signal": float(self.requested)} if run.step < run.total else {}

    def after_step(self, run, answers):
        if run.step >= run.total:
            run.stop = "done"
        elif answers.get("signal"):
            run.stop = "signal"

    def close(self, run):
        for s, h in self._old.items():
            signal.signal(s, h)


class TimeBudget(Part):
    """`max_minutes`: stops the run once the ranks agree the time is up (checked at log steps), and hands the
    schedule the agreed training time (optim.Schedule.at), so every rank computes the same learning rate. The
    time trained is carried across resumes as state.json's `elapsed_s`."""

    def __init__(self, budget_s: float):
        self.budget_s, self.offset, self.t0 = budget_s, 0.0, time.perf_counter()

    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.t0

    def start(self, run):
        self.offset, self.t0 = float(run.meta.get("elapsed_s", 0.0)), time.perf_counter()
        run.state = run.state.replace(lr_fn=run.state.lr_fn.at(self.offset))

    def ask(self, run):
        return {"elapsed_s": self.elapsed()} if run.log_step and run.step < run.total else {}

    def after_step(self, run, answers):
        if not answers:
            return
        agreed = answers["elapsed_s"] / run.engine.world_size
        run.state = run.state.replace(lr_fn=run.state.lr_fn.at(agreed))
        if agreed >= self.budget_s and run.stop is None:
            run.stop = "time"
            run.say(f"time budget of {run.cfg.max_minutes:g} min reached at step {run.step}")

    def state_dict(self):
        return {"elapsed_s": self.elapsed()}


class MetricsWriter(Part):
    """The train line at every log step: loss over the window's tokens, lr, grad norm, tokens/s and MFU over the
    time spent training (evaluation and checkpoints excluded), skipped steps; the progress bar."""
    bar = None

    def start(self, run):
        dev = run.engine.device
        self.window = torch.zeros(4, dtype=torch.float64, device=dev)   # loss_sum, tokens, steps, non-finite
        # made once: a tensor built from Python numbers on the device is a blocking host-to-device copy per step
        self.good, self.bad = self.window.new_tensor([1.0, 0.0]), self.window.new_tensor([0.0, 0.0, 1.0, 1.0])
        self.flops = 0.0   # model FLOPs in the window (stays 0 for a model perf.py has no formula for: no mfu)
        self.t0, self.paused0 = time.perf_counter(), run.paused_s
        self.bar = tqdm(total=run.total, initial=run.step, disable=not run.engine.is_main or run.plain,
                        desc="train", dynamic_ncols=True)

    def _row(self, run):
        m = run.out
        row = torch.cat([torch.stack([m["loss_sum"].double(), m["ntokens"].double()]), self.good])
        bad = m.get("nonfinite")
        return row if bad is None else torch.where(bad, self.bad, row)   # a skipped step: counted, its loss kept out

    def ask(self, run):
        if not run.log_step:
            return {}
        # the last step's grad norm is the same on every rank: summed, then divided by the world size
        norm = run.out["grad_norm"]
        return {"window": self.window + self._row(run), "grad_norm": norm / run.engine.world_size}

    def after_step(self, run, answers):
        self.flops += step_flops(run.state.model, run.batch.micro) or 0.0   # from shapes: no device access
        self.bar.update(1)
        if not answers:
            self.window += self._row(run)
            return
        loss_sum, ntok, _, nonfinite = answers["window"]
        dt = time.perf_counter() - self.t0 - (run.paused_s - self.paused0)
        cfg, main = run.cfg, run.engine.is_main
        probes = research.train_probes(cfg, run.state, run.batch.micro) if main else {}   # opt-in, rank 0
        line = run.metrics.log(run.step, "train", loss=loss_sum / max(ntok, 1), lr=run.out["lr"],
                               grad_norm=answers["grad_norm"], tokens_per_s=ntok / dt, epoch=run.batch.epoch,
                               **(mfu_fields(self.flops, dt, run.engine.device, cfg.precision) if main else {}),
                               nonfinite_steps=nonfinite / run.engine.world_size, **probes)
        self.bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
        self.window.zero_()
        self.flops, self.t0, self.paused0 = 0.0, time.perf_counter(), run.paused_s

    def close(self, run):
        if self.bar is not None:
            self.bar.close()


class Evaluator(Part):
    """Evaluations every `eval_every` steps (0: at the end of each epoch) and at the end, the test split last;
    the EMA twin on the same split as ema_<metric>. Tracks the best val loss (`best`, and `best_step`, which keeps
    that checkpoint from pruning) and stops after `early_stop_patience` evals without a better one; all three
    live in state.json, so a resumed run judges as the one that never stopped."""

    def start(self, run):
        self.best, self.best_step = run.meta.get("best"), run.meta.get("best_step")
        self.stale = int(run.meta.get("stale_evals", 0))
        self.last = None   # the step of the last evaluation
        if self._patience_spent(run):
            self._stop_early(run)

    def _patience_spent(self, run) -> bool:
        return bool(run.cfg.early_stop_patience) and self.stale >= run.cfg.early_stop_patience

    def _stop_early(self, run):
        run.stop = run.stop or "early"
        run.say(f"early stop at step {run.step}: no better val loss in {self.stale} evals "
                f"(best {self.best:.4f} at step {self.best_step})")

    def evaluate(self, run, split="valid") -> dict:
        engine, state = run.engine, run.state
        ranks = dict(reduce_sum=engine.reduce_sum, rank=engine.rank, world_size=engine.world_size,
                     device=engine.device)
        with run.paused():
            with engine.eval_state(state) as s:   # an engine whose params are partitioned gathers them here
                res = run.task.evaluate(s, split, **ranks)
            if res and state.ema is not None:
                ema = run.task.evaluate(research.ema_state(state), split, **ranks)
                res = {**res, **{f"ema_{k}": v for k, v in ema.items()}}
        if res:
            line = run.metrics.log(state.step, "val" if split == "valid" else split, **res)
            run.say(f"eval {line['split']} step {state.step}: " + " ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    def _judge(self, run):
        """Evaluate the val split; run.improved: a better (lower) val loss than any before."""
        res, self.last, run.evaluated = self.evaluate(run), run.step, True
        run.improved = bool(res) and (self.best is None or res["loss"] < self.best)
        if run.improved:
            self.best, self.best_step, self.stale = res["loss"], run.step, 0
        elif res:
            self.stale += 1

    def after_step(self, run, answers):
        run.evaluated = run.improved = False
        every = run.cfg.eval_every
        if (every and run.step % every == 0) or (not every and run.batch.epoch_end and run.step < run.total):
            self._judge(run)
            if self._patience_spent(run):
                self._stop_early(run)

    def end(self, run):
        run.evaluated = run.improved = False
        if run.stop == "signal":   # stopped by request: checkpoint and leave, the evaluations come at the end
            return
        if self.last != run.step:
            self._judge(run)
        self.evaluate(run, "test")

    def state_dict(self):
        return {"best": self.best, "best_step": self.best_step, "stale_evals": self.stale}


class Checkpointer(Part):
    """Checkpoints every `checkpoint_every` steps, every `checkpoint_every_s` seconds (the ranks agree at log
    steps; counted from the start of the last save), at evaluations (`always_save_checkpoint`, when
    checkpoint_every is 0), on a better val loss (the best checkpoint), on a stop and at the end. Each
    state.json carries every part's state_dict."""

    def start(self, run):
        self.saved = None   # the step of the last checkpoint this process wrote
        self.last_t = time.monotonic()

    def save(self, run, state=None):
        state = state or run.state
        extra = {"epoch": state.data["epoch"]}
        for p in run.parts:
            extra.update(p.state_dict())
        with run.paused():
            self.last_t = time.monotonic()
            path = run.engine.save(state, run.cfg.run_dir, keep=run.cfg.keep_checkpoints, extra=extra)
        self.saved = state.step
        return path

    def ask(self, run):
        if not run.cfg.checkpoint_every_s:
            return {}
        return {"due": float(time.monotonic() - self.last_t >= run.cfg.checkpoint_every_s)}

    def after_step(self, run, answers):
        cfg, s = run.cfg, run.step
        every = cfg.checkpoint_every and s % cfg.checkpoint_every == 0
        at_eval = not cfg.checkpoint_every and run.evaluated and cfg.always_save_checkpoint
        if every or at_eval or run.improved or answers.get("due"):   # an improved eval is the best checkpoint
            self.save(run)

    def end(self, run):
        if self.saved != run.step or run.improved:
            self.save(run)
        run.engine.wait_saves()   # an engine writing in the background (async_checkpoint) finishes here


class NonFiniteStop(Part):
    """nan_policy="stop": a non-finite step ends the run with the last good state saved (the step kept params and
    optimizer state: step.train_step), and one line naming the step. Reading the flag is a host sync, so only
    this policy reads it."""

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer

    def after_step(self, run, answers):
        bad = run.out.get("nonfinite")
        if run.cfg.nan_policy != "stop" or bad is None or not bool(bad):
            return
        good = run.state.replace(step=run.step - 1, data=run.batch.before)
        path = self.checkpointer.save(run, good) if self.checkpointer.saved != good.step else None
        run.engine.wait_saves()   # (async_checkpoint) the checkpoint named below is complete
        path = path or faults.latest(run.cfg.run_dir)
        raise faults.nonfinite(run.cfg, run.step, path, float(run.out["loss_sum"]), float(run.out["grad_norm"]))


def standard(run: Run, extra=()) -> list:
    """The parts of every fit, in the order they act after a step: a part that saves runs after the parts whose
    state it saves, and a stop is decided before the checkpoint that records it."""
    checkpointer = Checkpointer()
    budget = [TimeBudget(run.cfg.max_minutes * 60)] if run.cfg.max_minutes else []
    return [NonFiniteStop(checkpointer), MetricsWriter(), Evaluator(), *extra, Stopper(), *budget, checkpointer]
