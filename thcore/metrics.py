"""Run metrics from one writer, rank 0 only: metrics.jsonl (orjson), TensorBoard scalars (tensorboardX), an
optional Weights & Biases run, and a plain text line per train log step for logs that are not a terminal."""
import glob
import importlib.util
import math
import os
import resource
import time

import orjson
import torch

from .config import ConfigError

WANDB_HINT = "pip install -e '.[wandb]' (or pip install wandb)"


def check_wandb(project: str) -> None:
    """Before any work: a W&B sink asked for without the package is one line, not a failure after the start."""
    if project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"wandb_project={project!r}: needs the wandb package: {WANDB_HINT}")


class Metrics:
    def __init__(self, run_dir: str, enabled: bool = True, resume_step: int | None = None,
                 start: float | None = None, text=None, memory=None, wandb: dict | None = None):
        """`resume_step`: a resumed run drops the lines logged after its checkpoint, which it will log again
        (metrics.jsonl is cut back, TensorBoard gets tensorboardX's purge_step, so both read the same history).
        `start`: a time.perf_counter() value; every line carries `time_s`, the seconds since then (the fit
        loop passes the moment its fit started: curves against wall time).
        `text(line)`: called with every train line (the fit loop prints it when stdout is not a terminal).
        `memory()`: peak memory in GiB, added to train lines as `peak_mem_gib`.
        `wandb`: keyword arguments of wandb.init (project, name, dir, config, ...): the same lines go there."""
        self.enabled = enabled
        self.start = time.perf_counter() if start is None else start
        self.text, self.memory = text, memory
        self._file = self._tb = self._wandb = None
        if enabled:
            from tensorboardX import SummaryWriter
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "metrics.jsonl")
            if resume_step is not None and os.path.exists(path):
                keep = [r for r in read_jsonl(path) if r["step"] <= resume_step]
                with open(path + ".tmp", "wb") as f:
                    f.writelines(orjson.dumps(r) + b"\n" for r in keep)
                os.replace(path + ".tmp", path)
            self._file = open(path, "ab")
            # purge_step: TensorBoard drops the older events at steps >= it (those of the run before this resume).
            # tensorboardX names a file by the second it opened; a numbered suffix keeps a resume within the
            # same second from truncating the previous file, and sorts after it.
            tb = os.path.join(run_dir, "tb")
            n = len(glob.glob(os.path.join(tb, "events.out.tfevents.*")))
            self._tb = SummaryWriter(tb, filename_suffix=f".{n:06d}",
                                     purge_step=resume_step + 1 if resume_step is not None else None)
            if wandb:
                import wandb as wandb_lib
                self._wandb = wandb_lib.init(**wandb)

    def log(self, step: int, split: str, **values) -> dict:
        """One line `{"step", "split", ...}`; floats only (callers convert tensors at log time)."""
        if split == "train" and self.memory is not None:
            values["peak_mem_gib"] = self.memory()
        values = {**values, "time_s": time.perf_counter() - self.start}
        line = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
        if self.enabled:
            # JSON has no NaN/Infinity: write them as null so every line stays parseable
            row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}
            self._file.write(orjson.dumps(row) + b"\n")
            self._file.flush()
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
            if self._wandb is not None:
                self._wandb.log({f"{split}/{k}": float(v) for k, v in values.items()}, step=int(step))
            if self.text is not None and split == "train":
                self.text(line)
        return line

    def close(self):
        if self.enabled:
            self._file.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def text_line(line: dict, total: int) -> str:
    """A train line as one line of plain text (SLURM / nohup logs): step, loss, lr, grad norm, tokens/s, MFU,
    peak memory."""
    parts = [f"step {line['step']}/{total}", f"loss {line['loss']:.4f}", f"lr {line['lr']:.3g}"]
    if "grad_norm" in line:
        parts.append(f"grad_norm {line['grad_norm']:.3g}")
    if "tokens_per_s" in line:
        parts.append(f"{line['tokens_per_s']:,.0f} tok/s")
    if "mfu" in line:
        parts.append(f"mfu {100 * line['mfu']:.2f}%")
    if "peak_mem_gib" in line:
        parts.append(f"peak mem {line['peak_mem_gib']:.2f} GiB")
    if line.get("nonfinite_steps"):
        parts.append(f"{line['nonfinite_steps']:g} non-finite steps skipped")
    return " | ".join(parts)


def peak_memory_gib(device) -> float:
    """The device's peak allocated memory (CUDA), or this process's peak resident set (CPU), in GiB. Neither
    waits for the device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


def read_jsonl(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]
