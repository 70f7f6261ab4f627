"""How a run starts, decided here once (`th.py run` and the launchers/ entry points call this module):

- in this process: engine="eager" without max_restarts;
- under torchrun on this machine: ddp / fsdp / deepspeed as one process per GPU, or `nproc` gloo processes on a
  CPU-only machine (each one launchers/multinode.py); an eager run with max_restarts > 0 as one process
  (launchers/single.py), to get torchrun's supervision.

`--max_restarts=N` becomes torchrun's `--max-restarts=N`: when a worker dies, torchrun restarts the whole group and
every worker resumes from the latest complete checkpoint (resume="auto").

torchrun itself runs inside launchers/spawn.py (`torchrun_main` here): a worker that fails with bad input (exit 2)
or a run that cannot go on (3) has printed its one `error:` line, and torchrun's ChildFailedError would add a
traceback and a failure block and turn the status into 1; here that error becomes the worker's own exit status,
without the traceback."""
import json
import os
import signal
import socket
import subprocess
import sys

from .config import ConfigError, PeerFailed
from .engines import make_engine
from .loop import Interrupted, fit

LAUNCHERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launchers")


def workers(cfg, overrides: dict) -> tuple[str | None, int]:
    """(the launchers/ script torchrun starts, or None to train in this process; how many processes)."""
    if cfg.engine == "eager":
        return ("single.py" if cfg.max_restarts else None), 1
    return "multinode.py", nproc(cfg, overrides)


def nproc(cfg, overrides: dict) -> int:
    """An explicit --nproc wins; else one process per GPU; else the recipe's `nproc` (CPU-only machine)."""
    import torch
    if "nproc" not in overrides and cfg.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return cfg.nproc


def run(recipe: str, overrides: dict):
    """`th.py run RECIPE --field=value ...`: train as the config says, here or under torchrun."""
    from .recipe import configure
    cfg, mod = configure(recipe, overrides)
    script, n = workers(cfg, overrides)
    if script is None:
        return one_process(cfg, mod.build, recipe)
    if cfg.engine == "deepspeed":   # a missing DeepSpeed or a contradicting ds_config: one line, before torchrun
        from .engines.deepspeed import check
        check(cfg, n)
    return spawn(recipe, cfg, overrides, script, n)


def one_process(cfg, build, recipe: str | None = None):
    """Train in this process (launchers/single.py)."""
    engine = make_engine(cfg)
    try:
        return fit(cfg, build(cfg), engine, launch={"recipe": recipe})
    finally:
        engine.close()


def one_rank(cfg, build, recipe: str | None = None):
    """Train as one rank of a torchrun job (launchers/multinode.py)."""
    if cfg.engine == "eager":
        raise ConfigError("engine='eager' trains in one process; under torchrun use --engine=ddp (or deepspeed), "
                          "or run it with `python th.py run RECIPE`")
    engine = make_engine(cfg)
    try:
        state = fit(cfg, _build_rank0_first(cfg, build, engine), engine, launch={"recipe": recipe})
    except Interrupted:   # every rank agreed to stop at the same step: they still meet at the exit barrier
        engine.close()
        raise
    except BaseException:
        engine.close(clean=False)   # this rank may have failed alone: no barrier; torchrun stops the others
        raise
    engine.close()
    return state


def _build_rank0_first(cfg, build, engine):
    """The task, built by rank 0 while the others wait: building may prepare a corpus into the run directory
    (tasks/translation.py), which the others then find ready. If rank 0 fails, the others stop quietly (its
    error names the cause)."""
    import torch
    done = torch.zeros(1, device=engine.device)
    if engine.rank == 0:
        try:
            task = build(cfg)
            done += 1
        finally:
            engine.reduce_sum(done)
        return task
    if not engine.reduce_sum(done).item():
        raise PeerFailed("rank 0 could not build the task")
    return build(cfg)


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
    return [sys.executable, os.path.join(LAUNCHERS, "spawn.py"), f"--nproc_per_node={n}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", f"--max-restarts={max_restarts}",
            os.path.join(LAUNCHERS, script), "--recipe", recipe, *(_arg(k, v) for k, v in fields.items())]


def spawn(recipe: str, cfg, overrides: dict, script: str, n: int):
    """torchrun on this machine around `script`, `n` processes; exits with its status."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))   # share the cores, no oversubscription
    env["TH_COMMAND"] = json.dumps([sys.executable, *sys.argv])   # the user's command, for launches.jsonl
    # its own session: a terminal's Ctrl-C reaches torchrun once, through us; torchrun passes it to each worker
    # (each in its own session too), whose first SIGINT/SIGTERM means "checkpoint and stop" (parts.Stopper)
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


def torchrun_main(argv: list[str]):
    """torchrun, with the first failed worker's status instead of a traceback (launchers/spawn.py)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_quiet)
    try:
        torchrun(argv)
    except ChildFailedError as e:
        sys.exit(_status(e))
    except SignalException as e:   # a forwarded Ctrl-C / SIGTERM: the workers saved and said so; no traceback
        sys.exit(128 + int(e.sigval))


def worker_main(argv: list[str]):
    """A torchrun worker's command line (launchers/multinode.py): --recipe RECIPE [--field=value ...]."""
    import fire

    from .cli import run_launcher
    from .engines.runtime import check_torchrun_env
    try:   # before anything else: without torchrun's environment the first collective would hang or crash
        check_torchrun_env("launchers/multinode.py")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        fire.Fire(lambda recipe, **overrides: run_launcher(one_rank, recipe, overrides), command=argv)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        # a failed or stopped rank leaves at once: its checkpoint and logs are closed by now, and Python's own
        # finalization of a torch process whose peer died took 3-4 s more on 2 CPU cores (measured)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
