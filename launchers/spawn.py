"""`python th.py run RECIPE` for engines that run one process per device: start torchrun on this machine around
launchers/multinode.py (one process per GPU, or `nproc` gloo processes on CPU) and exit with its status.

`--max_restarts=N` becomes torchrun's `--max-restarts=N`: when a worker dies, torchrun restarts the whole group and
every worker resumes from the latest complete checkpoint (resume="auto"). An eager run with max_restarts > 0 also
runs under torchrun, as one process around launchers/single.py, to get the same supervision.

torchrun itself runs inside this file (`python launchers/spawn.py TORCHRUN_ARGS...`, its `__main__` below): a
worker that fails with bad input (exit 2) or a run that cannot go on (3) has printed its one `error:` line, and
torchrun's ChildFailedError would add a traceback and a failure block and turn the status into 1; here that
error becomes the worker's own exit status, without the traceback."""
import json
import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nproc(cfg, overrides: dict) -> int:
    """An explicit --nproc wins; else one process per GPU; else the recipe's `nproc` (CPU-only machine)."""
    import torch
    if "nproc" not in overrides and cfg.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return cfg.nproc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _arg(k, v) -> str:
    # the workers parse values with fire (Python literals): repr keeps a string a string ('1e-3', '007', 'a b')
    return f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"


def command(recipe: str, n: int, overrides: dict, port: int, max_restarts: int = 0,
            script: str = "multinode.py") -> list[str]:
    # `nproc` is spent here; passed on, torchrun's argparse would also take `--nproc=` for a prefix of its own
    # --nproc-per-node (ambiguous) even after the script name. `max_restarts` is spent here too.
    fields = {k: v for k, v in overrides.items() if k not in ("nproc", "max_restarts")}
    return [sys.executable, os.path.abspath(__file__), f"--nproc_per_node={n}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", f"--max-restarts={max_restarts}",
            os.path.join(ROOT, "launchers", script), "--recipe", recipe, *(_arg(k, v) for k, v in fields.items())]


def spawn(recipe: str, cfg, overrides: dict):
    script = "multinode.py"
    if cfg.engine == "eager":   # a multi-process recipe asked to run eagerly: that is one process, here
        if not cfg.max_restarts:
            from launchers.single import main
            from thcore.recipe import load
            return main(cfg, load(recipe).build, recipe)
        script = "single.py"   # one process, supervised by torchrun
    n = 1 if script == "single.py" else nproc(cfg, overrides)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))   # share the cores, no oversubscription
    env["TH_COMMAND"] = json.dumps([sys.executable, *sys.argv])   # the user's command, for launches.jsonl
    # its own session: a terminal's Ctrl-C reaches torchrun once, through us; torchrun passes it to each worker
    # (each in its own session too), whose first SIGINT/SIGTERM means "checkpoint and stop" (loop.py)
    proc = subprocess.Popen(command(recipe, n, overrides, _free_port(), cfg.max_restarts, script), env=env,
                            start_new_session=True)
    received = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    # torchrun reports a stop as a failure: after a forwarded signal, exit as a graceful stop does (cli.py)
    sys.exit(130 if received and rc != 0 else rc)


EXPLAINED = (2, 3, 130)   # bad input, a run that cannot go on, a graceful stop: the worker said why, in one line


def _status(e) -> int:
    """The exit status of a failed torchrun job: the first failed worker's own (a signal -N as 128 + N). Any
    other failure (a crash, a kill) keeps torchrun's summary of it, without the launcher's traceback."""
    _, failure = e.get_first_failure()
    code = failure.exitcode
    status = 128 - code if code < 0 else code or 1
    if status not in EXPLAINED:
        print(e, file=sys.stderr)
    return status


def _quiet(record) -> bool:
    """torchrun's log lines that only repeat what an explained failure said already."""
    if record.msg.startswith("failed (exitcode: %s)") and record.args and record.args[0] in EXPLAINED:
        return False
    return not record.msg.startswith("Sending process %s closing signal")


if __name__ == "__main__":   # torchrun, with the first failed worker's status instead of a traceback
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_quiet)
    try:
        torchrun(sys.argv[1:])
    except ChildFailedError as e:
        sys.exit(_status(e))
    except SignalException as e:   # a forwarded Ctrl-C / SIGTERM: the workers saved and said so; no traceback
        sys.exit(128 + int(e.sigval))
