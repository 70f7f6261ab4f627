"""Run metrics: metrics.jsonl (orjson), TensorBoard scalars (tensorboardX) and a tqdm bar; rank 0 only."""
import math
import os
import time

import orjson


class Metrics:
    def __init__(self, run_dir: str, enabled: bool = True, resume_step: int | None = None,
                 start: float | None = None):
        """`resume_step`: a resumed run drops the lines logged after its checkpoint, which it will log again.
        `start`: a time.perf_counter() value; every line carries `time_s`, the seconds since then (the fit
        loop passes the moment its fit started: curves against wall time)."""
        self.enabled = enabled
        self.start = time.perf_counter() if start is None else start
        self._file = self._tb = None
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
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def log(self, step: int, split: str, **values) -> dict:
        """One line `{"step", "split", ...}`; floats only (callers convert tensors at log time)."""
        values = {**values, "time_s": time.perf_counter() - self.start}
        line = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
        if self.enabled:
            # JSON has no NaN/Infinity: write them as null so every line stays parseable
            row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}
            self._file.write(orjson.dumps(row) + b"\n")
            self._file.flush()
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
        return line

    def close(self):
        if self.enabled:
            self._file.close()
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]
