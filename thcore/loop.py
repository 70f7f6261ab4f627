"""The fit loop: batches -> engine.step -> log / eval / checkpoint. Reads top to bottom."""
import contextlib
import datetime
import importlib.metadata
import json
import os
import signal
import socket
import sys
import time

import torch
from tqdm import tqdm

from . import checkpoint, faults, research
from .config import ConfigError
from .data.loader import device_batches
from .func import num_params
from .metrics import Metrics, check_wandb, peak_memory_gib, text_line
from .perf import mfu_fields, step_flops
from .profiler import Profiler


class Interrupted(KeyboardInterrupt):
    """Raised after a stop request (Ctrl-C, SIGTERM) once the current step finished and a checkpoint is saved."""


class _GracefulStop:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step (never mid-update: the state is
    updated in place); a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self._old = {}
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        except ValueError:   # not the main thread: no handlers, Ctrl-C behaves as usual
            pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _write_config(cfg, run_dir, step: int) -> str | None:
    """Write config.json once the start has succeeded. A config that differs from the one already there (a resume
    with changed fields) keeps the previous one as config.<step>.json; returns a line naming the changes."""
    os.makedirs(run_dir, exist_ok=True)
    path, new = os.path.join(run_dir, "config.json"), cfg.to_dict()
    note = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            old = {"<config.json>": "unreadable"}
        if old == new:
            return None
        keep, n = os.path.join(run_dir, f"config.{step}.json"), 1
        while os.path.exists(keep):
            keep, n = os.path.join(run_dir, f"config.{step}.{n}.json"), n + 1
        os.replace(path, keep)
        missing = "(absent)"
        changed = [f"{k} {old.get(k, missing)!r} -> {new.get(k, missing)!r}" for k in sorted(old.keys() | new.keys())
                   if old.get(k, missing) != new.get(k, missing)]
        note = (f"config: {len(changed)} field{'s' * (len(changed) != 1)} changed at step {step}: "
                f"{', '.join(changed)} (the previous config.json is kept as {os.path.basename(keep)})")
    tmp = os.path.join(run_dir, f".config.json.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(cfg.to_json())
    os.replace(tmp, path)
    return note


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _record_launch(run_dir, launch: dict | None, engine, step: int, resumed_from: str | None):
    """One line per successful start in launches.jsonl: how the run was started, where, with what."""
    launch = launch or {}
    command = json.loads(os.environ["TH_COMMAND"]) if "TH_COMMAND" in os.environ else [sys.executable, *sys.argv]
    row = {"step": step, "resumed_from": resumed_from,
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "recipe": launch.get("recipe"), "command": command, "cwd": os.getcwd(), "host": socket.gethostname(),
           "engine": engine.name, "device": str(engine.device), "world_size": engine.world_size,
           "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                        **{d: _version(d) for d in ("deepspeed", "torch-handle")}}}
    with open(os.path.join(run_dir, "launches.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def fit(cfg, task, engine, log=print, launch: dict | None = None):
    """Train `task` with `engine` as `cfg` says; resumes from the run directory's latest checkpoint.

    Nothing in the run directory changes until the start has succeeded (the checkpoint, if any, is loaded): a
    start that fails leaves it as it was. `launch`: {"recipe": path}, recorded in launches.jsonl."""
    run_dir, main = cfg.run_dir, engine.is_main
    fit_start = time.perf_counter()   # metrics lines carry time_s, seconds since here
    say = (lambda *a, **k: tqdm.write(" ".join(map(str, a)))) if main else (lambda *a, **k: None)
    # a log file (SLURM, nohup, a pipe) gets one plain line per log step; a terminal gets the progress bar
    plain = not (sys.stdout.isatty() and sys.stderr.isatty())
    check_wandb(cfg.wandb_project)

    steps_per_epoch = task.batches_per_epoch(engine.world_size) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size={cfg.batch_size}: the training set is smaller than one step "
                          f"(batch_size x world_size {engine.world_size} x grad_accum {cfg.grad_accum})")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    research.check_config(cfg, engine.name)
    state = task.init_state(total, device=engine.build_device)
    if cfg.ema_decay:   # before restore: a checkpoint's ema.safetensors loads into it
        state = research.with_ema(state, cfg.ema_decay)
    state = engine.init(state)
    state, meta, resumed_from = engine.restore(state, checkpoint.resolve(cfg.resume, run_dir))
    # best checkpoint and early stopping (fields of the LM config; other configs keep every eval's checkpoint
    # and never stop early). Both counters live in state.json, so a resumed run judges as the one that never stopped.
    patience = getattr(cfg, "early_stop_patience", 0)
    always_save = getattr(cfg, "always_save_checkpoint", True)
    best_step, stale = (meta or {}).get("best_step"), int((meta or {}).get("stale_evals", 0))
    # a time budget (the translation config's max_minutes): the task's clock, carried across resumes
    clock = getattr(task, "clock", None)
    if clock is not None and meta:
        clock.resume(meta.get("elapsed_s", 0.0))
    # the start has succeeded: from here on the run directory is written
    changed = None
    if main:
        changed = _write_config(cfg, run_dir, state.step)
        _record_launch(run_dir, launch, engine, state.step, resumed_from)
        task.save_assets(run_dir)
    wandb = dict(project=cfg.wandb_project, name=cfg.name, group=cfg.name, dir=run_dir, job_type="train",
                 config={**cfg.to_dict(), "start_step": state.step}) if cfg.wandb_project else None
    metrics = Metrics(run_dir, main, resume_step=state.step if resumed_from else None, start=fit_start,
                      text=(lambda line: say(text_line(line, total))) if plain else None,
                      memory=lambda: peak_memory_gib(engine.device), wandb=wandb)

    # an engine that partitions the params (DeepSpeed ZeRO-3) counts them itself
    n_params = engine.num_params(state) if hasattr(engine, "num_params") else num_params(state.params)
    say(f"model: {type(state.model).__name__}, {n_params:,} parameters | engine {engine.name} "
        f"on {engine.device} x {engine.world_size} | precision {cfg.precision}")
    say(task.summary)
    per_rank = getattr(cfg, "max_tokens", 0)   # a task that batches by padded tokens, not sentences
    unit, per_rank = ("padded tokens at most", per_rank) if per_rank else ("", cfg.batch_size)
    say(f"global batch: {per_rank} x {engine.world_size} ranks x {cfg.grad_accum} accum = "
        f"{per_rank * engine.world_size * cfg.grad_accum}{' ' + unit if unit else ''} | "
        f"{steps_per_epoch} steps/epoch, {total} steps")
    if resumed_from:
        say(f"resumed from {resumed_from} at step {state.step}")
    if changed:
        say(changed)

    def evaluate(state, split="valid"):
        # an engine whose params are partitioned (DeepSpeed ZeRO-3) hands evaluation a state with whole params
        with engine.eval_state(state) if hasattr(engine, "eval_state") else contextlib.nullcontext(state) as s:
            res = task.evaluate(s, engine, split)
        if res and state.ema is not None:   # the EMA params on the same split, as ema_<metric>
            ema = task.evaluate(research.ema_state(state), engine, split)
            res = {**res, **{f"ema_{k}": v for k, v in ema.items()}}
        if res:
            line = metrics.log(state.step, "val" if split == "valid" else split, **res)
            say(f"eval {line['split']} step {state.step}: " + " ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    def save(state):
        nonlocal last_save_t
        last_save_t = time.monotonic()   # checkpoint_every_s counts from the start of the last save
        return engine.save(state, run_dir, keep=cfg.keep_checkpoints,
                           extra={"epoch": state.data["epoch"], "best_step": best_step, "stale_evals": stale,
                                  **({"elapsed_s": clock.elapsed()} if clock is not None else {})})

    def judge(state, res):
        """(state, improved): track the best eval loss (lower is better) and the evals since it."""
        nonlocal best_step, stale
        if not res:
            return state, False
        if state.best is None or res["loss"] < state.best:
            best_step, stale = state.step, 0
            return state.replace(best=res["loss"]), True
        stale += 1
        return state, False

    def early_stop() -> bool:
        return bool(patience) and stale >= patience

    def agree_stop(stop, step) -> bool:
        """Stop after `step`? Ranks get a signal at different steps (or one rank alone gets it): with several,
        they decide together at log steps; a rank stopping alone would deadlock the others' next collective."""
        if engine.world_size == 1:
            return stop.requested
        if step % cfg.log_every:
            return False
        return engine.reduce_sum(torch.tensor([float(stop.requested)], device=engine.device)).item() > 0

    def save_due(step) -> bool:
        """checkpoint_every_s: time for a checkpoint? With several ranks they decide together at log steps."""
        if not cfg.checkpoint_every_s:
            return False
        due = time.monotonic() - last_save_t >= cfg.checkpoint_every_s
        if engine.world_size == 1:
            return due
        if step % cfg.log_every:
            return False
        return engine.reduce_sum(torch.tensor([float(due)], device=engine.device)).item() > 0

    def out_of_time(step) -> bool:
        """Past the time budget? Checked at log steps, where the ranks also agree on the time (the schedule
        reads it: their learning rates must match)."""
        if clock is None or step % cfg.log_every:
            return False
        t = torch.tensor([clock.elapsed()], dtype=torch.float64, device=engine.device)
        clock.agreed = engine.reduce_sum(t).item() / engine.world_size
        return clock.agreed >= clock.budget_s

    bar = tqdm(total=total, initial=state.step, disable=not main or plain, desc="train", dynamic_ncols=True)
    window = torch.zeros(4, dtype=torch.float64, device=engine.device)   # loss_sum, tokens, steps, non-finite
    # made once: a tensor built from Python numbers on the device is a blocking host-to-device copy per step
    counts_good, row_bad = window.new_tensor([1.0, 0.0]), window.new_tensor([0.0, 0.0, 1.0, 1.0])
    t0, last_eval, last_save = time.perf_counter(), None, None
    flops = 0.0   # model FLOPs since the last log line (stays 0 for a model perf.py has no formula for: no mfu)
    last_save_t, current = time.monotonic(), state.step   # current: the step being run, for error messages
    try:
        profiler = Profiler(os.path.join(run_dir, "profile"), cfg.profile_steps, enabled=cfg.profile and main,
                            log=say)
        with _GracefulStop() as stop, profiler:
            stopping, timed_out = agree_stop(stop, state.step), False
            while state.step < total and not stopping and not early_stop() and not timed_out:
                epoch, start = state.data["epoch"], state.data["index"]
                group = []
                for batch in device_batches(task.train_loader(epoch, start, engine), engine.device):
                    group.append(batch)
                    if len(group) < cfg.grad_accum:
                        continue
                    prev, current = state.step, state.step + 1
                    state, m = engine.step(state, group)
                    profiler.step()
                    bad = m.get("nonfinite")   # the step kept params and optimizer state (step.train_step)
                    if cfg.nan_policy == "stop" and bad is not None and bool(bad):   # a host sync, only under "stop"
                        good = state.replace(step=prev)   # the data cursor is still the one before this step
                        path = save(good) if last_save != prev else faults.latest(run_dir)
                        raise faults.nonfinite(cfg, current, path, float(m["loss_sum"]), float(m["grad_norm"]))
                    state = state.replace(data={"epoch": epoch, "index": state.data["index"] + len(group)})
                    trained, group = group, []
                    flops += step_flops(state.model, trained) or 0.0   # from shapes: no device access
                    row = torch.cat([torch.stack([m["loss_sum"].double(), m["ntokens"].double()]), counts_good])
                    if bad is not None:   # a skipped step: counted, and kept out of the loss (its loss is NaN/Inf)
                        row = torch.where(bad, row_bad, row)
                    window += row
                    bar.update(1)
                    s = state.step
                    if s % cfg.log_every == 0 or s == total:
                        # the one host sync of a log step (the last step's grad norm is the same on every rank)
                        norm = torch.as_tensor(m["grad_norm"]).reshape(1).to(window)
                        loss_sum, ntok, _, nonfinite, grad_norm = torch.cat([engine.reduce_sum(window), norm]).tolist()
                        dt = time.perf_counter() - t0
                        probes = research.train_probes(cfg, state, trained) if main else {}   # opt-in, rank 0
                        line = metrics.log(s, "train", loss=loss_sum / max(ntok, 1), lr=m["lr"],
                                           grad_norm=grad_norm, tokens_per_s=ntok / dt, epoch=epoch,
                                           **(mfu_fields(flops, dt, engine.device, cfg.precision) if main else {}),
                                           nonfinite_steps=nonfinite / engine.world_size, **probes)
                        bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
                        window.zero_()
                        flops = 0.0
                        t0 = time.perf_counter()
                    improved = False
                    if cfg.eval_every and s % cfg.eval_every == 0:
                        state, improved = judge(state, evaluate(state))
                        last_eval = s
                    due = save_due(s)   # every rank asks (a collective at log steps), whatever the others say
                    if (cfg.checkpoint_every and s % cfg.checkpoint_every == 0) or improved or due or \
                            (not cfg.checkpoint_every and last_eval == s and always_save):
                        save(state)   # an improved eval is always saved: it is the best checkpoint
                        last_save = s
                    stopping = s < total and agree_stop(stop, s)
                    timed_out = s < total and out_of_time(s)
                    if s >= total or stopping or early_stop() or timed_out:
                        break
                else:   # the epoch ran out: next epoch from its first batch
                    state = state.replace(data={"epoch": epoch + 1, "index": 0})
                    if not cfg.eval_every and state.step < total:
                        state, improved = judge(state, evaluate(state))
                        last_eval = state.step
                        if (not cfg.checkpoint_every and always_save) or improved:
                            save(state)
                            last_save = state.step
                    stopping = agree_stop(stop, state.step)
            if stopping and state.step < total:
                if last_save != state.step:
                    save(state)
                say(f"stopped at step {state.step}; run the same command again to resume")
                raise Interrupted(state.step)
        if timed_out:
            say(f"time budget of {cfg.max_minutes:g} min reached at step {state.step}")
        if early_stop():
            say(f"early stop at step {state.step}: no better val loss in {stale} evals "
                f"(best {state.best:.4f} at step {best_step})")
        improved = False
        if last_eval != state.step:
            state, improved = judge(state, evaluate(state))
        evaluate(state, "test")
        if last_save != state.step or improved:
            save(state)
    except (RuntimeError, MemoryError) as e:   # out of memory, a lost peer: one line naming the step
        why = faults.explain(e, cfg, engine.world_size, current)
        if why is None:
            raise
        raise why from e
    finally:
        bar.close()
        metrics.close()
    return state
