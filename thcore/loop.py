"""The fit loop: batches -> engine.step -> log / eval / checkpoint. Reads top to bottom."""
import os
import signal
import time

import torch
from tqdm import tqdm

from . import checkpoint
from .config import ConfigError
from .data.loader import to_device
from .func import num_params
from .metrics import Metrics


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


def _write_config(cfg, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, f".config.json.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(cfg.to_json())
    os.replace(tmp, os.path.join(run_dir, "config.json"))


def fit(cfg, task, engine, log=print):
    """Train `task` with `engine` as `cfg` says; resumes from the run directory's latest checkpoint."""
    run_dir, main = cfg.run_dir, engine.is_main
    say = (lambda *a, **k: tqdm.write(" ".join(map(str, a)))) if main else (lambda *a, **k: None)
    if main:
        _write_config(cfg, run_dir)

    steps_per_epoch = task.batches_per_epoch(engine.world_size) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size={cfg.batch_size}: the training set is smaller than one step "
                          f"(batch_size x world_size {engine.world_size} x grad_accum {cfg.grad_accum})")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    state = engine.init(task.init_state(total))
    state, _, resumed_from = engine.restore(state, checkpoint.resolve(cfg.resume, run_dir))
    if main:
        task.save_assets(run_dir)
    metrics = Metrics(run_dir, main, resume_step=state.step if resumed_from else None)

    say(f"model: {type(state.model).__name__}, {num_params(state.params):,} parameters | engine {engine.name} "
        f"on {engine.device} x {engine.world_size} | precision {cfg.precision}")
    say(task.summary)
    say(f"global batch: {cfg.batch_size} x {engine.world_size} ranks x {cfg.grad_accum} accum = "
        f"{cfg.batch_size * engine.world_size * cfg.grad_accum} | {steps_per_epoch} steps/epoch, {total} steps")
    if resumed_from:
        say(f"resumed from {resumed_from} at step {state.step}")

    def evaluate(state, split="valid"):
        res = task.evaluate(state, engine, split)
        if res:
            line = metrics.log(state.step, "val" if split == "valid" else split, **res)
            say(f"eval {line['split']} step {state.step}: " + " ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    def save(state):
        return engine.save(state, run_dir, keep=cfg.keep_checkpoints, extra={"epoch": state.data["epoch"]})

    bar = tqdm(total=total, initial=state.step, disable=not main, desc="train", dynamic_ncols=True)
    window = torch.zeros(3, dtype=torch.float64, device=engine.device)   # loss_sum, tokens, steps
    t0, last_eval, last_save = time.perf_counter(), None, None
    try:
        with _GracefulStop() as stop:
            while state.step < total and not stop.requested:
                epoch, start = state.data["epoch"], state.data["index"]
                group = []
                for batch in task.train_loader(epoch, start, engine):
                    group.append(to_device(batch, engine.device))
                    if len(group) < cfg.grad_accum:
                        continue
                    state, m = engine.step(state, group)
                    state = state.replace(data={"epoch": epoch, "index": state.data["index"] + len(group)})
                    group = []
                    window += torch.stack([m["loss_sum"].double(), m["ntokens"].double(), window.new_ones(())])
                    bar.update(1)
                    s = state.step
                    if s % cfg.log_every == 0 or s == total:
                        loss_sum, ntok, _ = engine.reduce_sum(window).tolist()   # the only host sync
                        dt = time.perf_counter() - t0
                        line = metrics.log(s, "train", loss=loss_sum / max(ntok, 1), lr=m["lr"],
                                           grad_norm=m["grad_norm"].item(), tokens_per_s=ntok / dt, epoch=epoch)
                        bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
                        window.zero_()
                        t0 = time.perf_counter()
                    if cfg.eval_every and s % cfg.eval_every == 0:
                        res = evaluate(state)
                        last_eval = s
                        if res and (state.best is None or res["loss"] < state.best):
                            state = state.replace(best=res["loss"])
                    if (cfg.checkpoint_every and s % cfg.checkpoint_every == 0) or \
                            (not cfg.checkpoint_every and last_eval == s):
                        save(state)
                        last_save = s
                    if s >= total or stop.requested:
                        break
                else:   # the epoch ran out: next epoch from its first batch
                    state = state.replace(data={"epoch": epoch + 1, "index": 0})
                    if not cfg.eval_every and state.step < total:
                        res = evaluate(state)
                        last_eval = state.step
                        if res and (state.best is None or res["loss"] < state.best):
                            state = state.replace(best=res["loss"])
                        if not cfg.checkpoint_every:
                            save(state)
                            last_save = state.step
            if stop.requested and state.step < total:
                if last_save != state.step:
                    save(state)
                say(f"stopped at step {state.step}; run the same command again to resume")
                raise Interrupted(state.step)
        if last_eval != state.step:
            res = evaluate(state)
            if res and (state.best is None or res["loss"] < state.best):
                state = state.replace(best=res["loss"])
        evaluate(state, "test")
        if last_save != state.step:
            save(state)
    finally:
        bar.close()
        metrics.close()
    return state
