"""The FSDP engine (FSDP2, `fully_shard`) for real: torchrun with 2 gloo processes, checked against the eager
engine on the same data and seed, and its checkpoints resumed under other engines and world sizes.

As in tests/integration/test_ddp.py: dropout 0 (each rank draws its own masks) and SGD (its update is linear in the
gradient, so the reduction order's rounding stays at rounding level)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from helpers import (B, ENV, MULTINODE, ROOT, RUN, SCRIPTS, STEPS, TIMEOUT, assert_close, free_port,
                     shakespeare_chars, th, tiny_config)
from thcore.shards import Reader
from thcore.engines.eager import EagerEngine
from thcore.loop import fit
from thcore.tasks.translation import TranslationTask

TRANSLATION = os.path.join(ROOT, "recipes", "ddp_translation.py")
GPT = os.path.join(ROOT, "recipes", "gpt2_shakespeare_char_cpu.py")
GPT_RUN = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0, "batch_size": 4,
           "optimizer": "sgd", "lr": 0.1, "max_steps": STEPS, "eval_iters": 2, "eval_every": STEPS, "log_every": 5,
           "checkpoint_every": 10, "keep_checkpoints": 10, "warmup_steps": 0, "dist_timeout_s": 120}


def fsdp(out, recipe=TRANSLATION, nproc=2, **kw):
    """`torchrun --nproc_per_node=N launchers/multinode.py --recipe R --engine=fsdp --field=value...`"""
    fields = {**(RUN if recipe == TRANSLATION else GPT_RUN), "engine": "fsdp", "out_dir": out, **kw}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}", MULTINODE, "--recipe", recipe,
                        *(f"--{k}={v}" for k, v in fields.items())],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"torchrun exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def params(run, step=STEPS):
    """Whole params of a checkpoint, sharded (fsdp) or not (eager, ddp)."""
    return Reader(os.path.join(run, "checkpoints", f"step_{step}")).read_all("model")


def eager(out, **kw):
    cfg = tiny_config(out, **{**RUN, "out_dir": str(out), **kw})
    return fit(cfg, TranslationTask(cfg), EagerEngine(cfg))


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    return shakespeare_chars(tmp_path_factory, 50_000)


def from_step_10(src, dst):
    """A copy of run `src` as it was at step 10 (its later checkpoint left out)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(f"step_{STEPS}", "latest"))
    with open(os.path.join(dst, "checkpoints", "latest"), "w") as f:
        f.write("step_10\n")


def _close(a, b, rtol=1e-5, atol=1e-6):
    # k_proj biases have an exactly zero true gradient: theirs is rounding noise, bounded instead of compared
    assert_close({k: v for k, v in a.items() if "k_proj.bias" not in k},
                 {k: v for k, v in b.items() if "k_proj.bias" not in k}, rtol=rtol, atol=atol)
    for k in a:
        if "k_proj.bias" in k:
            assert (a[k] - b[k]).abs().max() < 1e-4, k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """fsdp x batch B on 2 ranks and eager x batch 2B on one, the same 20 steps."""
    root = tmp_path_factory.mktemp("fsdp")
    two, one = str(root / "fsdp2"), root / "eager"
    fsdp(two)
    eager(one, batch_size=2 * B)
    return two, str(one)


def test_fsdp_two_ranks_equal_eager_with_twice_the_batch(reference):
    two, one = reference
    _close(params(two), params(one))
    for ckpt in (os.path.join(two, "checkpoints", f"step_{s}") for s in (10, STEPS)):
        names = sorted(os.listdir(ckpt))
        # each rank wrote its own rows: a model and an optimizer file per rank, an index, no whole-model file
        assert names == ["manifest.json", "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
                         "optimizer-00000-of-00002.safetensors", "optimizer-00001-of-00002.safetensors",
                         "shards.json", "state.json"]
        for name in names:   # pickle-free: every file is safetensors or JSON, and opens as such
            path = os.path.join(ckpt, name)
            if name.endswith(".safetensors"):
                assert load_file(path)
            else:
                assert json.load(open(path))
        shard0 = load_file(os.path.join(ckpt, "model-00000-of-00002.safetensors"))
        whole = params(two, int(ckpt.rsplit("_", 1)[1]))
        assert all(shard0[k].shape[0] == (whole[k].shape[0] + 1) // 2 for k in shard0 if whole[k].dim())


def test_accumulation_and_activation_checkpointing(tmp_path):
    fsdp(str(tmp_path / "f"), grad_accum=2, activation_checkpointing=True)
    eager(tmp_path / "e", batch_size=2 * B, grad_accum=2)
    _close(params(str(tmp_path / "f")), params(str(tmp_path / "e")))


def test_gpt_with_cpu_offload_equals_ddp(tmp_path, chars):
    """A GPT rank draws its own random windows (data/lm.py: the seed, the batch index and the rank), so 2 ranks
    x B are not 1 x 2B windows: the peer with the same batches is DDP, itself equal to eager
    (tests/integration/test_ddp.py)."""
    fsdp(str(tmp_path / "f"), recipe=GPT, data_dir=chars, offload="cpu")
    fsdp(str(tmp_path / "d"), recipe=GPT, data_dir=chars, engine="ddp")
    _close(params(str(tmp_path / "f")), params(str(tmp_path / "d")))


def test_checkpoints_move_between_engines_and_world_sizes(reference, tmp_path):
    """fsdp(2) -> eager(1), fsdp(2) -> fsdp(2), eager(1) -> fsdp(2): each resumed run ends where the run that
    never stopped ended (the eager resume at twice the batch, the same global batch)."""
    two, one = reference
    from_step_10(two, tmp_path / "to_eager")
    eager(tmp_path / "to_eager", batch_size=2 * B)
    _close(params(str(tmp_path / "to_eager")), params(two))
    from_step_10(two, tmp_path / "to_fsdp")
    fsdp(str(tmp_path / "to_fsdp"))
    assert_close(params(str(tmp_path / "to_fsdp")), params(two), rtol=0, atol=0)   # same ranks, same order: bitwise
    from_step_10(one, tmp_path / "from_eager")
    fsdp(str(tmp_path / "from_eager"))
    _close(params(str(tmp_path / "from_eager")), params(one))


def test_fsdp_fields_are_checked_before_any_work(tmp_path):
    p = th("run", TRANSLATION, "--engine=fsdp", "--dp_replicate=3", "--nproc=2", f"--out_dir={tmp_path / 'r'}",
           check=False, env=ENV, timeout=TIMEOUT)
    assert p.returncode == 2 and "dp_replicate=3 x dp_shard=" in p.stderr
    p = th("run", TRANSLATION, "--engine=fsdp", "--zero_stage=2", f"--out_dir={tmp_path / 'r'}", check=False)
    assert p.returncode == 2 and p.stderr.strip() == \
        "error: zero_stage=2: only used with engine='deepspeed', not engine='fsdp'"


def test_hybrid_sharding_on_four_ranks_then_two(reference, tmp_path):
    """dp_replicate=2 x dp_shard=2 on 4 ranks (B/2 each: the same global batch), then 2 ranks resume its
    checkpoint: the replicas write nothing twice, and the shards of 4 become the shards of 2."""
    two, one = reference
    hybrid = str(tmp_path / "hybrid")
    fsdp(hybrid, nproc=4, dp_replicate=2, batch_size=B // 2)
    ckpt = os.path.join(hybrid, "checkpoints", "step_10")
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("model")) == \
        ["model-00000-of-00004.safetensors", "model-00001-of-00004.safetensors"]   # the first replica's ranks
    _close(params(hybrid, 10), params(one, 10))
    _close(params(hybrid), params(one))
    resumed = str(tmp_path / "resumed")
    from_step_10(hybrid, resumed)
    fsdp(resumed)   # 2 ranks, 1-D mesh, from the 4-rank checkpoint to step 20
    _close(params(resumed), params(two))


def test_a_model_built_on_meta_is_drawn_shard_by_shard_as_the_whole_one(tmp_path):
    """4 ranks build a 241 MB GPT (fp32, 63M params, an uneven 8191-row vocabulary) on the meta device and the
    FSDP engine draws each rank's shards in place: every param equals the same model built whole on one device,
    bitwise, and a rank's host memory grows by about its shard (a quarter of the model), never by the model.
    The whole build, measured the same way, grows by the model: the measurement can tell them apart."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=1",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                        os.path.join(SCRIPTS, "fsdp_build.py"), str(tmp_path)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-6000:]
    for r in range(4):
        rank = json.load(open(tmp_path / f"rank{r}.json"))
        assert rank["names"] and rank["equal"], r
        assert rank["whole_mb"] >= 3.99 * rank["shard_mb"], rank
        # measured 2026-12-02: 65 MB over a 60 MB shard (the shard, plus one drawn block and its rows)
        assert rank["build_peak_mb"] < 1.5 * rank["shard_mb"], rank
        assert rank["whole_peak_mb"] > 0.9 * rank["whole_mb"], rank


def test_commands_read_sharded_checkpoints(reference, tmp_path):
    two, _ = reference
    res = json.loads(th("eval", two, "--split=test", "--device=cpu").stdout)
    logged = [r for r in map(json.loads, open(os.path.join(two, "metrics.jsonl"))) if r["split"] == "test"][-1]
    assert res["loss"] == pytest.approx(logged["loss"], abs=1e-4)   # the run's own end-of-run score, same params
    th("export", two, tmp_path / "x")
    assert_close(load_file(str(tmp_path / "x" / "model.safetensors")), params(two), rtol=0, atol=0)


def test_a_damaged_shard_is_named_and_the_previous_checkpoint_resumed(reference, tmp_path):
    two, _ = reference
    run = tmp_path / "run"
    shutil.copytree(two, run)
    shard = run / "checkpoints" / f"step_{STEPS}" / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    p = fsdp(str(run))   # resumes step 10 and trains to step 20 again
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 1 and "model-00001-of-00002.safetensors: checksum mismatch" in warnings[0]
    assert_close(params(str(run)), params(two), rtol=0, atol=0)
