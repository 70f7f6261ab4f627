"""The start of a fit: the state built and restored, then (only once that has succeeded) the run directory
written and the run described. A start that fails leaves the run directory as it was."""
import datetime
import importlib.metadata
import json
import os
import socket
import sys
import time

import torch
from tqdm import tqdm

from . import checkpoint, research
from .config import ConfigError
from .metrics import Metrics, check_wandb, peak_memory_gib, text_line
from .parts import Run


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


def _restore(cfg, task, engine, total: int):
    """(state, the checkpoint's state.json or {}, the checkpoint it came from or None)."""
    research.check_config(cfg, engine.name)
    state = task.init_state(total, device=engine.build_device)
    if cfg.ema_decay:   # before restore: a checkpoint's ema.safetensors loads into it
        state = research.with_ema(state, cfg.ema_decay)
    state = engine.init(state)
    state, meta, resumed_from = engine.restore(state, checkpoint.resolve(cfg.resume, cfg.run_dir))
    return state, meta or {}, resumed_from


def begin(cfg, task, engine, launch: dict | None = None) -> Run:
    """The restored run, its directory written and its start described. `launch`: {"recipe": path}, recorded
    in launches.jsonl."""
    fit_start = time.perf_counter()   # metrics lines carry time_s, seconds since here
    main = engine.is_main
    say = (lambda line: tqdm.write(line)) if main else (lambda line: None)
    # a log file (SLURM, nohup, a pipe) gets one plain line per log step; a terminal gets the progress bar
    plain = not (sys.stdout.isatty() and sys.stderr.isatty())
    check_wandb(cfg.wandb_project)
    steps_per_epoch = task.batches_per_epoch(engine.world_size) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size={cfg.batch_size}: the training set is smaller than one step "
                          f"(batch_size x world_size {engine.world_size} x grad_accum {cfg.grad_accum})")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    state, meta, resumed_from = _restore(cfg, task, engine, total)
    changed = None   # the start has succeeded: from here on the run directory is written
    if main:
        changed = _write_config(cfg, cfg.run_dir, state.step)
        _record_launch(cfg.run_dir, launch, engine, state.step, resumed_from)
        task.save_assets(cfg.run_dir)
    wandb = dict(project=cfg.wandb_project, name=cfg.name, group=cfg.name, dir=cfg.run_dir, job_type="train",
                 config={**cfg.to_dict(), "start_step": state.step}) if cfg.wandb_project else None
    metrics = Metrics(cfg.run_dir, main, resume_step=state.step if resumed_from else None, start=fit_start,
                      text=(lambda line: say(text_line(line, total))) if plain else None,
                      memory=lambda: peak_memory_gib(engine.device), wandb=wandb)
    say(f"model: {type(state.model).__name__}, {engine.num_params(state):,} parameters | engine {engine.name} "
        f"on {engine.device} x {engine.world_size} | precision {cfg.precision}")
    say(task.summary)
    per_rank, unit = task.per_rank_batch()
    say(f"global batch: {per_rank} x {engine.world_size} ranks x {cfg.grad_accum} accum = "
        f"{per_rank * engine.world_size * cfg.grad_accum}{' ' + unit if unit else ''} | "
        f"{steps_per_epoch} steps/epoch, {total} steps")
    if resumed_from:
        say(f"resumed from {resumed_from} at step {state.step}")
    if changed:
        say(changed)
    return Run(cfg=cfg, task=task, engine=engine, total=total, say=say, metrics=metrics, state=state, meta=meta,
               plain=plain, current=state.step)
