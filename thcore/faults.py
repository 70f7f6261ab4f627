"""The faults that end a run, each said in one line that names the step and what to do: a non-finite step under
nan_policy="stop", out of memory, a peer rank that died or hangs. docs/RELIABILITY.md lists what was tried.

The loop turns these errors into `TrainingAborted`; entry points print its line and exit with status 3
(cli.guarded), so a script can tell them from bad input (2) and a graceful stop (130).
"""
import torch
import torch.distributed as dist

from . import checkpoint

# gloo reports a lost peer as a plain RuntimeError; these are the phrases of its TCP transport
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
              "Connection refused", "NCCL communicator was aborted", "Socket Timeout")


class TrainingAborted(RuntimeError):
    """The run cannot go on; the message is one line naming the step, and the last complete checkpoint is
    intact (for a non-finite step under nan_policy="stop" it is the last good state, saved on the way out)."""


def _first_line(e: BaseException, n: int = 160) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= n else line[:n] + "..."


def is_oom(e: BaseException) -> bool:
    """CUDA out of memory, or host memory (offload, CPU runs): torch's CPU allocator raises a RuntimeError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or \
        (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def is_peer_lost(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):   # DistBackendError / DistNetworkError / DistStoreError
        return True
    return isinstance(e, RuntimeError) and any(p in str(e) for p in _PEER_LOST)


def latest(run_dir: str) -> str:
    found = checkpoint.candidates(checkpoint.root_of(run_dir))
    return found[0] if found else "none yet"


def oom_remedies(cfg) -> list[str]:
    """The changes to try, in order, leaving out those the config already has."""
    out = []
    if cfg.batch_size > 1:
        out.append(f"--batch_size={max(1, cfg.batch_size // 2)} --grad_accum={cfg.grad_accum * 2} "
                   "(the same global batch)")
    if not cfg.activation_checkpointing:
        out.append("--activation_checkpointing=True")
    if cfg.engine != "deepspeed":
        out.append("--engine=deepspeed --zero_stage=1, 2 or 3")
    elif cfg.zero_stage < 3:
        out.append(f"--zero_stage={cfg.zero_stage + 1}")
    if cfg.offload == "none":
        out.append("--offload=cpu (engine='deepspeed', zero_stage >= 1)")
    return out


def explain(e: BaseException, cfg, world_size: int, step: int) -> TrainingAborted | None:
    """A one-line TrainingAborted for an error that ended step `step`, or None when it is none of ours."""
    if isinstance(e, TrainingAborted):
        return None
    if is_oom(e):
        tried = "; ".join(f"{i}) {r}" for i, r in enumerate(oom_remedies(cfg), 1)) or "a smaller model"
        return TrainingAborted(f"out of memory in step {step} ({_first_line(e, 100)}). Try, in order: {tried}. "
                               f"The last complete checkpoint is intact ({latest(cfg.run_dir)}): the same command "
                               "with the new options resumes from it")
    if world_size > 1 and is_peer_lost(e):
        return TrainingAborted(f"step {step}: lost contact with another rank ({_first_line(e)}): a peer died or "
                               f"did not answer within dist_timeout_s={cfg.dist_timeout_s}. Latest checkpoint: "
                               f"{latest(cfg.run_dir)}; torchrun --max-restarts (th.py run --max_restarts=N) "
                               "restarts the group from it")
    return None


def nonfinite(cfg, step: int, saved: str | None, loss: float, grad_norm: float) -> TrainingAborted:
    where = f"saved the last good state (step {step - 1}) as {saved}" if saved else \
        f"the last complete checkpoint is {latest(cfg.run_dir)}"
    return TrainingAborted(f"step {step}: non-finite loss or gradients (loss sum {loss:g}, grad_norm {grad_norm:g}) "
                           f"with nan_policy='stop'; {where}. Check the data of that step, lower lr, or use "
                           "nan_policy='skip' to skip such steps")
