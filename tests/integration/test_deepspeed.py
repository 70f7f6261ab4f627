"""The DeepSpeed engine for real, on DeepSpeed's CPU accelerator with gloo: ZeRO stages 0-3 with one and two
processes against the eager engine, CPU offload (DeepSpeedCPUAdam), save -> resume, export -> eager eval, and the
config errors.

The DeepSpeed runs happen in two torchrun jobs (1 and 2 processes) started once per session (the `ds_runs`
fixture); each job runs its list of runs one after another through the real fit loop, using this file as the
worker script. The tests then read the run directories. The first job compiles DeepSpeed's CPU ops once
(shm_comm, cpu_adam; cached in ~/.cache/torch_extensions).

Tolerance: losses agree with the eager engine's to a relative 1e-5. The gradients are the eager ones up to fp32
summation order: 1 process sums in the same order (the observed differences are <= 1 ulp of the loss), 2
processes pad and sum each rank's half of the batch separately and add the halves. Adam's first steps are
~sign(g), which turns a rounding difference in a zero gradient into an lr-sized step, but the only exactly-zero
true gradients here are the attention key biases, which the loss does not depend on (softmax is invariant to a
constant shift of the scores): the losses stay within rounding of each other (<= 3e-7 absolute observed on a loss
of ~5), and 1e-5 relative leaves room for another BLAS without hiding a wrong normalisation (a factor 2 in the
gradient changes the step-2 loss by ~1e-2).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/ (run as the worker)
from helpers import ROOT, TEST_RECIPES, TINY, free_port, rows, run_args, shakespeare_chars, th  # noqa: E402
from helpers import stop_after  # noqa: E402

K = 6   # steps per equivalence run
ZERO2 = os.path.join(ROOT, "recipes", "zero2_translation.py")
ZERO3_GPT = os.path.join(ROOT, "recipes", "zero3_gpt.py")
SINGLE = os.path.join(ROOT, "recipes", "single_translation.py")
FAULTS = os.path.join(TEST_RECIPES, "fault_recipe.py")
# max_len 24 holds every demo sentence (<= 18 tokens with eos) and bounds greedy decoding at eval
BASE = {**TINY, "max_steps": K, "log_every": 1, "max_len": 24, "demo_valid_size": 32, "demo_test_size": 8,
        "lr_schedule": "constant"}
# two ranks draw different dropout masks than one process (stream = rank): those runs use dropout 0, and the eager
# reference takes both ranks' batches as one batch of twice the size (DistributedSampler's shards of one
# permutation: rank r's batch j is every other sample of the 1-process batch j of twice the size). 33 validation
# sentences in batches of 8: rank 0 evaluates 3 batches, rank 1 two (ZeRO-3 must not wait on the other rank).
TWO = {**BASE, "dropout": 0.0, "batch_size": 8, "demo_valid_size": 33, "eval_batch_size": 8}
TINY_GPT = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8, "eval_iters": 4,
            "max_steps": K, "eval_every": 0, "log_every": 1, "warmup_steps": 2}
NAN = {**BASE, "max_steps": 4, "poison_at": 3, "checkpoint_every": 1, "keep_checkpoints": 10, "eval_every": 0}
TWO_NAN = {k: TWO[k] for k in ("dropout", "batch_size", "demo_valid_size", "eval_batch_size")}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 1500   # per torchrun job: includes the one-time compile of DeepSpeed's CPU ops on 2 shared cores


def runs_one():
    """Runs of the 1-process job: name -> config overrides of recipes/zero2_translation.py."""
    r = {f"z{s}": {**BASE, "zero_stage": s} for s in (0, 1, 2, 3)}
    r["z2_accum"] = {**BASE, "zero_stage": 2, "grad_accum": 2}
    r["z2_offload"] = {**BASE, "zero_stage": 2, "offload": "cpu"}
    r["z2_bf16"] = {**BASE, "zero_stage": 2, "precision": "bf16"}
    r["user_config"] = {**BASE, "deepspeed_config": "USER_CONFIG"}
    # a non-finite step 3 under nan_policy='skip': DeepSpeed's update is skipped (ZeRO-0 fp32 runs the plain torch
    # optimizer, which the engine keeps from a non-finite gradient itself)
    r["z0_nan"] = {**NAN, "zero_stage": 0}
    if have_async_io():   # ZeRO-Infinity: optimizer state and params swapped to disk (needs libaio)
        r["z3_nvme"] = {**BASE, "zero_stage": 3, "offload": "nvme", "nvme_path": "NVME_PATH"}
    return r


def have_async_io() -> bool:
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().get_op_builder("AsyncIOBuilder")
    return builder is not None and builder().is_compatible(verbose=False)


def runs_two(gpt_data: str):
    r = {f"z{s}": {**TWO, "zero_stage": s} for s in (0, 1, 2, 3)}
    r["z2_accum"] = {**TWO, "zero_stage": 2, "grad_accum": 2}
    # DeepSpeed keeps parameters under 1e5 elements whole at ZeRO-3 (all of this tiny model's): a config that
    # partitions every one, with activation checkpointing (its recompute gathers again in backward)
    r["z3_partitioned"] = {**TWO, "deepspeed_config": "Z3_PARTITIONED", "activation_checkpointing": True}
    # save -> resume: ZeRO-3, and ZeRO-3 with parameters and optimizer offloaded to the CPU, stopped after step 4
    # (SIGINT, as Ctrl-C) and started again with the same config; against the same runs uninterrupted
    for name, kw in (("z3", {}), ("z3_offload", {"offload": "cpu"})):
        resume = {**TWO, "zero_stage": 3, "max_steps": 8, "checkpoint_every": 3, **kw}
        r[f"{name}_full"] = resume
        r[f"{name}_cut"] = {**resume, "stop_after": 4}
    r["gpt"] = {**TINY_GPT, "recipe": ZERO3_GPT, "data_dir": gpt_data}   # ZeRO-3 + CPU offload + checkpointing
    r["z3_nan"] = {**NAN, **TWO_NAN, "zero_stage": 3}
    # bf16 with the gradients of 2 micro-batches accumulated (and reduced) in fp32
    r["z2_bf16_nan"] = {**NAN, **TWO_NAN, "zero_stage": 2, "precision": "bf16", "grad_accum": 2}
    return r


USER_CONFIG = {   # a user's ds_config.json, used as-is: "auto" takes the recipe's values
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
}
Z3_PARTITIONED = {**USER_CONFIG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def configure(recipe=ZERO2, **kw):
    from thcore.recipe import configure as conf
    return conf(recipe, kw)


# -- the worker: what torchrun starts (python tests/integration/test_deepspeed.py worker SPEC OUT) --------------

def _poison_at(task, step, accum):
    """Step `step`'s first micro-batch (on every rank) gets an infinite loss (tests/helpers.py's poisoned
    loss_fn)."""
    import torch
    orig = task.train_loader

    def loader(epoch, start, engine):
        for i, b in enumerate(orig(epoch, start, engine)):
            yield {**b, "poison": torch.ones(())} if epoch == 0 and start + i == (step - 1) * accum else b
    task.train_loader = loader
    return task


def worker(spec_path: str, out: str):
    import torch.distributed as dist

    import thcore.step
    from helpers import poisoned
    from thcore.engines.deepspeed import DeepSpeedEngine
    from thcore.loop import Interrupted, fit
    thcore.step.loss_fn = poisoned(thcore.step.loss_fn)   # what LossModule calls; only a marked batch changes
    # one process group for all the runs: DeepSpeed caches its groups per process (an engine leaves a process
    # group it did not create in place)
    dist.init_process_group("gloo")
    with open(spec_path) as f:
        spec = json.load(f)
    report = {}
    for name, kw in spec.items():
        kw = dict(kw)
        stop, recipe, poison = kw.pop("stop_after", None), kw.pop("recipe", ZERO2), kw.pop("poison_at", None)
        cfg, mod = configure(recipe, **kw, out_dir=os.path.join(out, name))
        t0 = time.perf_counter()
        for attempt in (0, 1) if stop else (1,):   # a cut run: stopped, then the same command again
            engine = DeepSpeedEngine(cfg)
            task = mod.build(cfg) if poison is None else _poison_at(mod.build(cfg), poison, cfg.grad_accum)
            try:
                fit(cfg, stop_after(task, stop) if attempt == 0 else task, engine)
            except Interrupted:
                pass
            report[name] = {"optimizer": type(engine.engine.basic_optimizer).__name__,
                            "seconds": time.perf_counter() - t0}
            engine.close()
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.path.insert(0, ROOT)
    worker(sys.argv[2], sys.argv[3])
    sys.exit(0)


# -- the tests ---------------------------------------------------------------------------------------------------

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="DeepSpeed is not installed: pip install deepspeed")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from thcore.config import ConfigError, from_dict  # noqa: E402
from thcore.engines.eager import EagerEngine  # noqa: E402
from thcore.loop import fit  # noqa: E402
from thcore.metrics import read_jsonl  # noqa: E402

QUIET = dict(log=lambda *a, **k: None)


def torchrun(nproc: int, runs: dict, out: str) -> dict:
    spec = os.path.join(out, "spec.json")
    os.makedirs(out, exist_ok=True)
    with open(spec, "w") as f:
        json.dump(runs, f)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.abspath(__file__),
                        "worker", spec, out], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    if p.returncode:
        raise AssertionError(f"torchrun exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-8000:]}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    report["_wall"] = {"seconds": time.perf_counter() - t0}
    return report


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The eager references run with the workers' one thread per process: the same BLAS summation order, and no
    OpenMP oversubscription (2 threads on 2 busy cores made an eager step 50x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gpt_data(tmp_path_factory):
    """The first 100k characters of tiny Shakespeare, prepared char-level."""
    return shakespeare_chars(tmp_path_factory, 100_000)


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory, gpt_data):
    """{1: (out dir, report), 2: (out dir, report)}: both torchrun jobs, run once for this file."""
    root = tmp_path_factory.mktemp("ds")
    files = {}
    for name, conf in (("USER_CONFIG", USER_CONFIG), ("Z3_PARTITIONED", Z3_PARTITIONED)):
        files[name] = str(root / f"{name.lower()}.json")
        with open(files[name], "w") as f:
            json.dump(conf, f)
    out = {}
    for n, runs in ((1, runs_one()), (2, runs_two(gpt_data))):
        runs = {k: {**v, "deepspeed_config": files[v["deepspeed_config"]]} if v.get("deepspeed_config") else v
                for k, v in runs.items()}
        runs = {k: {**v, "nvme_path": str(root / "nvme")} if v.get("nvme_path") else v for k, v in runs.items()}
        d = str(root / f"world{n}")
        out[n] = (d, torchrun(n, runs, d))
        print(f"\nworld {n}: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in out[n][1].items()))
    return out


@pytest.fixture(scope="module")
def eager_runs(tmp_path_factory):
    """The eager engine on the same recipe, seed and batches: get(name, **overrides) -> run dir (run once)."""
    root, done = tmp_path_factory.mktemp("eager"), {}

    def get(name, **kw):
        if name not in done:
            cfg, mod = configure(SINGLE, **kw, out_dir=str(root / name))
            fit(cfg, mod.build(cfg), EagerEngine(cfg))
            done[name] = cfg.run_dir
        return done[name]
    return get


def losses(run) -> list[float]:
    return [r["loss"] for r in rows(run, "train")]


def val_loss(run) -> float:
    return rows(run, "val")[-1]["loss"]


def assert_losses_equal(ds, ref, rtol=1e-5):
    a, b = losses(ds), losses(ref)
    assert len(a) == len(b) > 0
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=0.0)
    torch.testing.assert_close(val_loss(ds), val_loss(ref), rtol=rtol, atol=0.0)


def eager_two(eager_runs, **kw):
    """The 2-process runs' eager reference: one process, both ranks' batches as one."""
    return eager_runs("two" + "".join(f"_{k}{v}" for k, v in kw.items()),
                      **{**TWO, "batch_size": 2 * TWO["batch_size"], **kw})


@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_process_equals_eager(ds_runs, eager_runs, stage):
    assert_losses_equal(os.path.join(ds_runs[1][0], f"z{stage}"), eager_runs("one", **BASE))


@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_processes_equal_eager(ds_runs, eager_runs, stage):
    assert_losses_equal(os.path.join(ds_runs[2][0], f"z{stage}"), eager_two(eager_runs))


@needs_deepspeed
def test_zero3_partitioned_with_activation_checkpointing_equals_eager(ds_runs, eager_runs):
    assert_losses_equal(os.path.join(ds_runs[2][0], "z3_partitioned"), eager_two(eager_runs))


@needs_deepspeed
def test_gradient_accumulation_equals_eager(ds_runs, eager_runs):
    assert_losses_equal(os.path.join(ds_runs[1][0], "z2_accum"), eager_runs("one_accum", **BASE, grad_accum=2))
    assert_losses_equal(os.path.join(ds_runs[2][0], "z2_accum"), eager_two(eager_runs, grad_accum=2))


@needs_deepspeed
def test_user_deepspeed_config_is_used_as_is(ds_runs, eager_runs):
    run = os.path.join(ds_runs[1][0], "user_config")
    assert_losses_equal(run, eager_runs("one", **BASE))
    ckpt = os.path.join(run, "checkpoints", f"step_{K}")
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    assert os.path.isfile(os.path.join(ckpt, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))   # its ZeRO-1


@needs_deepspeed
def test_cpu_offload_trains_with_deepspeed_cpu_adam(ds_runs, eager_runs):
    assert ds_runs[1][1]["z2_offload"]["optimizer"] == "DeepSpeedCPUAdam"
    assert ds_runs[2][1]["z3_offload_full"]["optimizer"] == "DeepSpeedCPUAdam"
    assert ds_runs[1][1]["z2"]["optimizer"] == "AdamW"   # no offload: torch's AdamW, our parameter groups
    # DeepSpeedCPUAdam is AdamW in its own vectorised kernel: the eager numbers up to rounding
    run = os.path.join(ds_runs[1][0], "z2_offload")
    assert_losses_equal(run, eager_runs("one", **BASE), rtol=1e-4)
    assert losses(run)[-1] < losses(run)[0]


@needs_deepspeed
def test_nvme_offload_trains(ds_runs, eager_runs):
    """ZeRO-3 with optimizer state and params on NVMe (here: a temporary directory). Skipped without libaio, where
    test_config_errors checks the one-line error instead."""
    if "z3_nvme" not in ds_runs[1][1]:
        pytest.skip("DeepSpeed's async_io op cannot be built here (libaio missing)")
    assert ds_runs[1][1]["z3_nvme"]["optimizer"] == "DeepSpeedCPUAdam"
    assert_losses_equal(os.path.join(ds_runs[1][0], "z3_nvme"), eager_runs("one", **BASE), rtol=1e-4)


@needs_deepspeed
def test_bf16_trains(ds_runs):
    a = losses(os.path.join(ds_runs[1][0], "z2_bf16"))
    assert len(a) == K and all(map(math.isfinite, a)) and a[-1] < a[0]


@needs_deepspeed
def test_zero3_gpt_recipe_trains(ds_runs):
    """recipes/zero3_gpt.py: ZeRO-3 + CPU offload (DeepSpeedCPUAdam) + activation checkpointing, 2 processes."""
    run = os.path.join(ds_runs[2][0], "gpt")
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert (cfg["zero_stage"], cfg["offload"], cfg["activation_checkpointing"]) == (3, "cpu", True)
    assert ds_runs[2][1]["gpt"]["optimizer"] == "DeepSpeedCPUAdam"
    a = losses(run)
    assert len(a) == K and a[-1] < a[0] and math.isfinite(val_loss(run))


@needs_deepspeed
@pytest.mark.parametrize("run", ["z3", "z3_offload"])
def test_checkpoint_layout_and_resume_equals_uninterrupted(ds_runs, run):
    """ZeRO-3 (and with CPU offload), 2 processes: stopped after step 4, resumed by the same command: the steps
    after the cut, the final eval and the saved fp32 weights and moments are the uninterrupted run's, bitwise.

    With offload, DeepSpeedCPUAdam keeps beta^t as a running product in its C++ state (not in the checkpoint): a
    resumed process recomputes it as pow(beta, t), so the update differs at the rounding level (1e-7 observed)."""
    from thcore.consolidate import consolidate
    out, _ = ds_runs[2]
    full, cut = os.path.join(out, f"{run}_full"), os.path.join(out, f"{run}_cut")
    ckpts = os.path.join(cut, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["latest", "step_4", "step_6", "step_8"]   # keep_checkpoints=3
    step4 = os.path.join(ckpts, "step_4")
    assert open(os.path.join(step4, "latest")).read().strip() == "global_step4"   # DeepSpeed's own layout
    assert {"state.json", "manifest.json", "latest", "global_step4", "zero_to_fp32.py"} <= set(os.listdir(step4))
    assert sorted(os.listdir(os.path.join(step4, "global_step4"))) == sorted(
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim"))
    meta = json.load(open(os.path.join(step4, "state.json")))
    assert meta["step"] == 4 and meta["data"] == {"epoch": 0, "index": 4}
    steps = [r["step"] for r in rows(cut, "train")]
    assert steps == list(range(1, 9)), "a resumed run logs each step once"
    a, opt_a, _ = consolidate(os.path.join(full, "checkpoints", "step_8"))
    b, opt_b, _ = consolidate(os.path.join(ckpts, "step_8"))
    if run == "z3":
        assert losses(cut) == losses(full) and val_loss(cut) == val_loss(full)
        assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    else:
        assert losses(cut)[:4] == losses(full)[:4]
        assert_losses_equal(cut, full, rtol=1e-6)
        # but for the attention key biases (their gradient is rounding noise, which Adam amplifies; the loss does
        # not depend on them), the weights agree to rounding as well
        torch.testing.assert_close({k: v for k, v in a.items() if not k.endswith("k_proj.bias")},
                                   {k: v for k, v in b.items() if not k.endswith("k_proj.bias")}, rtol=1e-5, atol=1e-6)


@needs_deepspeed
@pytest.mark.parametrize("world,run", [(1, "z0"), (1, "z2_bf16"), (2, "z3"), (2, "z3_partitioned"),
                                       (2, "z3_offload_cut"), (2, "gpt")])
def test_export_then_eager_eval_gives_the_same_val_loss(ds_runs, world, run, tmp_path):
    """`th.py export RUN OUT` consolidates the shards into an eager checkpoint: `--resume=OUT` on the eager engine
    (at the run's last step: no training, just the final evals) gives the DeepSpeed run's val loss."""
    from thcore.tasks.lm import LMConfig, LMTask
    from thcore.tasks.translation import TranslationConfig, TranslationTask
    src = os.path.join(ds_runs[world][0], run)
    export = tmp_path / "export"
    th("export", src, export)
    assert {"model.safetensors", "optimizer.safetensors", "state.json", "manifest.json",
            "config.json"} <= set(os.listdir(export))
    ds_cfg = json.load(open(os.path.join(src, "config.json")))
    kw = {k: v for k, v in ds_cfg.items() if k not in ("engine", "deepspeed_config", "offload", "zero_stage")}
    kw.update(out_dir=str(tmp_path / "eager"), resume=str(export), precision="fp32")
    Config, Task = (LMConfig, LMTask) if run == "gpt" else (TranslationConfig, TranslationTask)
    cfg = from_dict(Config, kw)
    state = fit(cfg, Task(cfg, **QUIET), EagerEngine(cfg))
    assert state.step == ds_cfg["max_steps"] and state.params.keys() == load_file(export / "model.safetensors").keys()
    # bf16 trains bf16 weights (fp32 masters); the eager eval runs the fp32 masters: same model, other rounding
    rtol = 2e-2 if ds_cfg["precision"] == "bf16" else 1e-5
    torch.testing.assert_close(val_loss(cfg.run_dir), val_loss(src), rtol=rtol, atol=0.0)


@needs_deepspeed
@pytest.mark.parametrize("world,run", [(1, "z0_nan"), (2, "z3_nan"), (2, "z2_bf16_nan")])
def test_a_non_finite_step_is_skipped_and_counted(ds_runs, world, run):
    """nan_policy='skip' (the default): step 3's infinite loss leaves the weights and the optimizer state as they
    were after step 2, bitwise; it is counted in the log line, and step 4 trains on."""
    from thcore.consolidate import consolidate
    out = os.path.join(ds_runs[world][0], run)
    (p2, o2, _), (p3, o3, m3), (p4, _, _) = (consolidate(os.path.join(out, "checkpoints", f"step_{s}"))
                                             for s in (2, 3, 4))
    assert m3["step"] == 3 and p2.keys() == p3.keys() and o2.keys() == o3.keys()
    assert all(torch.equal(p2[k], p3[k]) for k in p2) and all(torch.equal(o2[k], o3[k]) for k in o2)
    assert any(not torch.equal(p3[k], p4[k]) for k in p3) and all(torch.isfinite(p4[k]).all() for k in p4)
    assert [r["nonfinite_steps"] for r in rows(out, "train")] == [0, 0, 1, 0]


@needs_deepspeed
def test_nan_policy_stop_exits_3_naming_the_step(tmp_path):
    """`th.py run ... --engine=deepspeed --nproc=2 --nan_policy=stop` (ZeRO-2): exit status 3, one line naming
    step 7, and the step-6 checkpoint saved on the way out is the uninterrupted run's step 6, bitwise."""
    from thcore.consolidate import consolidate
    cut, ref = tmp_path / "cut", tmp_path / "ref"
    common = dict(engine="deepspeed", zero_stage=2, checkpoint_every=4)
    p = th("run", FAULTS, "--nproc=2", *run_args(cut, nan_policy="stop", max_steps=12, **common),
           env={**ENV, "TH_FAULT_NAN_STEP": "7"}, check=False, timeout=TIMEOUT)
    assert p.returncode == 3, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 7: non-finite loss or gradients") and "nan_policy='stop'" in last, last
    assert f"{cut}/checkpoints/step_6" in last, last
    th("run", FAULTS, "--nproc=2", *run_args(ref, max_steps=6, **common), env=ENV, timeout=TIMEOUT)
    (a, opt_a, _), (b, opt_b, _) = (consolidate(os.path.join(r, "checkpoints", "step_6")) for r in (cut, ref))
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)


@needs_deepspeed
def test_contradicting_config_is_one_line_error(tmp_path):
    cfgfile = tmp_path / "ds.json"
    cfgfile.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    p = th("run", ZERO2, f"--deepspeed_config={cfgfile}", "--batch_size=16", f"--out_dir={tmp_path / 'run'}",
           check=False, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"error: deepspeed_config='{cfgfile}': train_micro_batch_size_per_gpu=8 contradicts the recipe's "
        "batch_size=16; change one of them")
    from thcore.engines.deepspeed import check
    cfgfile.write_text(json.dumps({"gradient_accumulation_steps": 4, "train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=4 contradicts the recipe's grad_accum=1"):
        check(configure(deepspeed_config=str(cfgfile))[0], 2)
    cfgfile.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"train_batch_size=64 contradicts the recipe's batch_size x grad_accum x "
                                          r"world_size \(64 x 1 x 2\)=128"):
        check(configure(deepspeed_config=str(cfgfile))[0], 2)


@needs_deepspeed
def test_bf16_accumulates_gradients_in_fp32_where_zero_can():
    from thcore.engines.deepspeed import build_config
    fp32 = {"grad_accum_dtype": "fp32"}
    assert build_config(configure(zero_stage=2, precision="bf16")[0], 1)["data_types"] == fp32
    assert build_config(configure(zero_stage=3, precision="bf16")[0], 1)["data_types"] == fp32
    assert build_config(configure(zero_stage=1, precision="bf16", offload="cpu")[0], 1)["data_types"] == fp32
    # DeepSpeed's BF16_Optimizer would take over (its checkpoints are not ZeRO ones); fp32 needs nothing
    assert "data_types" not in build_config(configure(zero_stage=1, precision="bf16")[0], 1)
    assert "data_types" not in build_config(configure(zero_stage=2, precision="fp32")[0], 1)


@needs_deepspeed
def test_config_errors(tmp_path, monkeypatch):
    from thcore.engines.deepspeed import DeepSpeedEngine, build_config, check
    with pytest.raises(ConfigError, match="offload='cpu': needs zero_stage >= 1"):
        build_config(configure(zero_stage=0, offload="cpu")[0], 1)
    cfg = configure(zero_stage=3, offload="nvme", nvme_path=str(tmp_path))[0]
    if not have_async_io():
        with pytest.raises(ConfigError, match="offload='nvme': DeepSpeed's async_io op cannot be built on this "
                                              "machine: it needs libaio"):
            check(cfg, 1)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="precision='fp16': DeepSpeed's CPU accelerator has no fp16"):
        DeepSpeedEngine(configure(precision="fp16", device="cpu")[0])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    with pytest.raises(ConfigError, match="engine='deepspeed' runs one process per device under torchrun"):
        DeepSpeedEngine(configure()[0])


def test_missing_deepspeed_is_one_line_error(tmp_path, monkeypatch):
    from thcore.engines import make_engine
    monkeypatch.setitem(sys.modules, "deepspeed", None)   # `import deepspeed` now fails as if not installed
    with pytest.raises(ConfigError, match=r"engine='deepspeed': DeepSpeed is not installed; pip install "
                                          r"'torch-handle\[deepspeed\]'"):
        make_engine(configure()[0])
    code = ("import runpy, sys; sys.modules['deepspeed'] = None; "
            f"sys.argv = ['th.py', 'run', {ZERO2!r}, '--out_dir={tmp_path / 'run'}']; "
            "runpy.run_path('th.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: engine='deepspeed': DeepSpeed is not installed; pip install 'torch-handle[deepspeed]' "
        "(or pip install deepspeed)"]
