"""The DDP engine for real: torchrun with 2 gloo processes on this machine (and two `--nnodes=2` "nodes" on
127.0.0.1), checked against the eager engine on the same data and seed.

Every run here uses dropout 0: each rank draws its own dropout masks (stream = rank), so with dropout the 2-rank
run and the 1-process run are different (equally valid) computations. Equivalence runs use SGD: its update is
linear in the gradient, so reduction-order rounding stays at rounding level (Adam's first steps are ~sign(g) and
turn a rounding difference in a near-zero gradient into a full lr-sized step)."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import (B, ENV, MULTINODE, ROOT, RUN, STEPS, TEST_RECIPES, TIMEOUT, assert_close, free_port, rows,
                     run_args, shakespeare_chars, th, tiny_config)
from thcore.engines.eager import EagerEngine
from thcore.loop import fit
from thcore.tasks.translation import TranslationTask

RECIPE = os.path.join(ROOT, "recipes", "ddp_translation.py")
def torchrun(out, *launch, recipe=RECIPE, nproc=2, check=True, base=RUN, **kw):
    """`torchrun --nproc_per_node=N [launch...] launchers/multinode.py --recipe R --field=value...`"""
    launch = launch or ("--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *launch,
                        MULTINODE, "--recipe", recipe, *run_args(out, base, **kw)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    if check and p.returncode:
        raise AssertionError(f"torchrun exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def eager(out, **kw):
    """The same run in this process on the eager engine (world size 1)."""
    cfg = tiny_config(out, **{**RUN, "out_dir": str(out), **kw})
    return fit(cfg, TranslationTask(cfg), EagerEngine(cfg))


def params(run, step=STEPS):
    return load_file(os.path.join(run, "checkpoints", f"step_{step}", "model.safetensors"))


STOP_RECIPE = os.path.join(TEST_RECIPES, "ddp_stop_rank0.py")   # rank 0 alone gets SIGTERM at step 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two reference 2-rank runs, trained once per module (torchrun launches dominate this file's time):

    "stopped": `python th.py run` (it starts torchrun) of the DDP recipe, where rank 0 alone gets SIGTERM at
        step 12; the ranks must agree to stop at the next log step (15), checkpoint, exit; the same run is then
        resumed to the end by `torchrun ... launchers/multinode.py`.
    "nodes": the same job uninterrupted, as two `torchrun --nnodes=2 --nproc_per_node=1` processes (c10d),
        rank 0 writing its checkpoints in the background (async_checkpoint).
    Every save also checks that every rank's params equal rank 0's (DDPEngine._check_replicas), or fails."""
    root = tmp_path_factory.mktemp("ddp")
    recipe, stopped, nodes = STOP_RECIPE, str(root / "stopped"), str(root / "nodes")
    first = th("run", recipe, "--nproc=2", *run_args(stopped), timeout=TIMEOUT, env=ENV, check=False)
    resumed = torchrun(stopped, recipe=str(recipe))

    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=2", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test", MULTINODE, "--recipe", RECIPE,
           *run_args(nodes, async_checkpoint=True)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        logs = [n.communicate(timeout=TIMEOUT)[0] for n in procs]
    finally:
        for n in procs:
            n.kill()
    assert all(n.returncode == 0 for n in procs), "\n".join(logs)[-6000:]
    return {"stopped": stopped, "nodes": nodes, "first": first, "resumed": resumed}


# -- the launch contract ------------------------------------------------------------------------------------

def test_without_torchrun_a_one_line_error_says_how_to_launch(tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    cmds = ([MULTINODE, "--recipe", RECIPE],   # the launcher itself, and engine="ddp" through the one-process one
            [os.path.join(ROOT, "launchers", "single.py"), "--recipe", RECIPE, f"--out_dir={tmp_path}"])
    procs = [subprocess.Popen([sys.executable, *c], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 2, err
        assert "\n" not in err.strip() and err.startswith("error: ") and "RANK" in err and "torchrun --nproc_per_node" in err
        assert "Traceback" not in out + err


def test_cuda_path_differs_only_in_backend_and_device(monkeypatch, tmp_path):
    """No GPU in CI: the selection itself is what differs, so test it with CUDA's availability faked."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from thcore.engines import ddp, runtime
    cfg = tiny_config(tmp_path, engine="ddp", ddp_comm_hook="bf16_compress")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.backend_and_device("auto", 3) == ("nccl", torch.device("cuda", 3))
    assert runtime.backend_and_device("cpu", 3) == ("gloo", torch.device("cpu"))
    assert ddp.comm_hook(cfg, "nccl")[1] is default_hooks.bf16_compress_hook
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.backend_and_device("auto", 3) == ("gloo", torch.device("cpu"))
    assert ddp.comm_hook(cfg, "gloo")[1] is ddp.bf16_compress_hook_gloo


def test_epoch_shuffles_differ_by_epoch_repeat_by_seed_and_split_across_ranks(tmp_path):
    class Rank:
        device = torch.device("cpu")

        def __init__(self, rank, world):
            self.rank, self.world_size = rank, world

    def order(task, epoch, rank=0, world=1):   # one rank's training targets of an epoch, in order, unpadded
        return [tuple(t for t in row.tolist() if t != -100) for b in task.train_loader(epoch, 0, Rank(rank, world))
                for row in b["targets"]]
    cfg = tiny_config(tmp_path, resume="never")
    a, rerun = TranslationTask(cfg), TranslationTask(cfg)
    other = TranslationTask(tiny_config(tmp_path, resume="never", seed=1))
    assert order(a, 0) != order(a, 1)                                  # set_epoch: a new shuffle each epoch
    assert order(a, 1) == order(rerun, 1)                              # the same seed: the same shuffle
    assert order(a, 0) != order(other, 0)
    r0, r1 = order(a, 1, 0, 2), order(a, 1, 1, 2)
    assert len(r0) == len(r1) and sorted(r0 + r1) == sorted(order(a, 1))   # disjoint halves of the same epoch


# -- equivalence with one process ---------------------------------------------------------------------------

def test_two_ranks_equal_one_process_with_twice_the_batch(runs, tmp_path):
    run = runs["nodes"]
    ref = eager(tmp_path / "eager", batch_size=2 * B)
    assert_close(params(run), {k: v.cpu() for k, v in ref.params.items()})
    # rank 0 alone logs: one line per step, one final val and test line
    assert [r["step"] for r in rows(run, "train")] == [5, 10, 15, 20]
    assert f"global batch: {B} x 2 ranks x 1 accum = {2 * B}" in runs["first"].stdout + runs["first"].stderr
    assert len(rows(run, "val")) == 1 and len(rows(run, "test")) == 1 and os.listdir(os.path.join(run, "tb"))
    # eval sums loss and tokens over all ranks' shares (31 sentences: 16 + 15), not a mean of rank means
    ev = rows(str(tmp_path / "eager"), "val")[0]
    assert rows(run, "val")[0]["loss"] == pytest.approx(ev["loss"], rel=1e-5)
    assert rows(run, "val")[0]["exact_match"] == ev["exact_match"]
    losses = [r["loss"] for r in rows(run, "train")]
    assert losses[-1] < losses[0] - 0.5


def test_two_ranks_with_grad_accum_equal_one_process(tmp_path):
    torchrun(str(tmp_path / "ddp"), grad_accum=2, max_steps=10)
    ref = eager(tmp_path / "eager", batch_size=2 * B, grad_accum=2, max_steps=10)
    assert_close(params(str(tmp_path / "ddp"), 10), {k: v.cpu() for k, v in ref.params.items()})


def test_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path):
    """Params are replicated: a 2-rank checkpoint is a 1-process checkpoint; the data cursor counts batches
    per rank, so the 1-process run continues with the same global batch (2B)."""
    run = runs["stopped"]
    eager(tmp_path / "one", batch_size=2 * B, resume=os.path.join(run, "checkpoints", "step_10"))
    assert_close(params(str(tmp_path / "one")), params(run))


def test_two_nodes_on_localhost_agree_with_one_node_stopped_and_resumed(runs):
    """The uninterrupted two-node job and the one-node job stopped at step 15 and resumed: bitwise equal."""
    a, b = params(runs["nodes"]), params(runs["stopped"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


# -- the fused chunked loss inside the module DDP wraps ------------------------------------------------------

LM_RECIPE = os.path.join(ROOT, "recipes", "gpt2_shakespeare_char_cpu.py")
LM_RUN = {"engine": "ddp", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4,
          "optimizer": "sgd", "lr": 0.5, "warmup_steps": 0, "lr_schedule": "constant", "max_steps": 8,
          "eval_every": 8, "eval_iters": 2, "log_every": 4, "dist_timeout_s": 120}


def test_loss_module_runs_the_fused_loss_on_its_own_params(monkeypatch):
    """What DDP wraps: with ce_chunk the output layer + loss run fused (linear_cross_entropy, called with the
    module's own weight, padded rows included) and the gradients reaching .grad are the plain loss's."""
    from thcore import step
    from thcore.models import GPT
    torch.manual_seed(0)
    model = GPT(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16, vocab_multiple=64)
    data = torch.randint(0, 65, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"idx": data[:, :-1], "targets": data[:, 1:]}
    fused, calls = step.linear_cross_entropy, []
    monkeypatch.setattr(step, "linear_cross_entropy", lambda *a: calls.append((a[1], a[4])) or fused(*a))
    grads = {}
    for chunk in (0, 12):
        model.zero_grad()
        loss_sum, _ = step.LossModule(model, 0.0, chunk)(batch)
        loss_sum.backward()
        grads[chunk] = {k: p.grad.clone() for k, p in model.named_parameters()}
    (weight, chunk), = calls
    assert chunk == 12 and weight is model.transformer.wte.weight   # the module's own table, all 128 padded rows
    for k, g in grads[0].items():   # atol: a row's gradient sums O(1) softmax - one-hot terms that cancel
        torch.testing.assert_close(grads[12][k], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_ce_chunk_under_ddp_equals_the_plain_loss(tmp_path, tmp_path_factory):
    """2 gloo ranks with ce_chunk (accepted for engine='ddp') against the same run without it. The chunked loss
    sums the same terms in another order (per-chunk logsumexp, the output weight's gradient accumulated chunk by
    chunk), so they agree to fp32 rounding; SGD keeps that at rounding level over 8 steps (measured max abs
    difference 1.2e-7; bound rtol 1e-5, atol 1e-6)."""
    data = shakespeare_chars(tmp_path_factory, 50_000)
    plain, chunked = str(tmp_path / "plain"), str(tmp_path / "chunked")
    torchrun(plain, recipe=LM_RECIPE, base=LM_RUN, data_dir=data)
    torchrun(chunked, recipe=LM_RECIPE, base=LM_RUN, data_dir=data, ce_chunk=24)   # 128 tokens: 5 chunks + 8
    a, b = params(plain, 8), params(chunked, 8)
    assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a[k], b[k]) for k in a)   # equal bits would mean the fused path never ran
    assert [r["loss"] for r in rows(chunked, "train")] == pytest.approx([r["loss"] for r in rows(plain, "train")],
                                                                        rel=1e-5)


# -- gradient compression -----------------------------------------------------------------------------------

def _drift(run, ref, init):
    """|params - allreduce params| / |allreduce params - initial params|: error relative to the training motion."""
    a, b = params(run), params(ref)
    diff = sum(float((a[k] - b[k]).double().square().sum()) for k in b) ** 0.5
    motion = sum(float((b[k] - init[k]).double().square().sum()) for k in b) ** 0.5
    return diff / motion


def test_compressed_hooks_train_and_stay_within_compression_error(runs, tmp_path):
    ref = runs["nodes"]
    cfg = tiny_config(tmp_path, **RUN)
    init = TranslationTask(cfg).init_state(STEPS).params
    bf16, psgd = str(tmp_path / "bf16"), str(tmp_path / "powersgd")
    torchrun(bf16, ddp_comm_hook="bf16_compress")
    torchrun(psgd, ddp_comm_hook="powersgd", powersgd_rank=2, powersgd_start_iter=10)
    for run in (bf16, psgd):
        losses = [r["loss"] for r in rows(run, "train")]
        assert losses[-1] < losses[0] - 0.5, (run, losses)
        assert rows(run, "val")[0]["loss"] == pytest.approx(rows(ref, "val")[0]["loss"], rel=0.05)
    # bf16 keeps 8 bits of mantissa: a small but nonzero drift (zero would mean the hook never ran)
    assert 0 < _drift(bf16, ref, init) < 0.02   # measured 0.003
    # PowerSGD all-reduces plainly for its first powersgd_start_iter steps, then sends rank-2 factors
    # (with error feedback): identical until step 10, a larger but bounded drift after
    assert all(torch.equal(params(psgd, 10)[k], params(ref, 10)[k]) for k in params(ref, 10))
    assert 0.005 < _drift(psgd, ref, init) < 0.3   # measured 0.026; fp32 rounding alone is ~1e-6


# -- stop and resume ----------------------------------------------------------------------------------------

def test_a_stop_on_one_rank_is_agreed_and_the_same_command_resumes(runs):
    first, run = runs["first"], runs["stopped"]
    assert first.returncode != 0 and "stopped at step 15" in first.stdout + first.stderr, first.stderr[-4000:]
    assert "resumed from" in runs["resumed"].stdout + runs["resumed"].stderr
    # the stop saved step 15 (between the regular checkpoints at 10 and 20); the log has no step twice
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_10", "step_15", "step_20"]
    assert [r["step"] for r in rows(run, "train")] == [5, 10, 15, 20]
    # bitwise equal to the uninterrupted job: test_two_nodes_on_localhost_agree_with_one_node_stopped_and_resumed
