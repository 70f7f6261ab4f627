"""The FSDP engine: torch's FSDP2 (`fully_shard`), one process per device under torchrun.

Every block (each child of the model's `nn.ModuleList`s, thcore/remat.py:blocks) and then the root are sharded on a DeviceMesh: 1-D
(`dp_shard` ranks), or 2-D for hybrid sharding (`dp_replicate` x `dp_shard`: replicated across the first mesh
dimension, e.g. nodes, sharded within). The params become DTensors, and the state's params pytree holds them:
train_step's math is unchanged (torch's foreach/fused AdamW and the global-norm clipping run on DTensors, and a
norm over shards is the true global norm). FSDP only replaces *how gradients are computed*: `backward()`
through the sharded module, whose hooks all-gather params per block and reduce-scatter the gradients. Under
gradient accumulation the micro-batches before the last keep their gradients unsharded and unreduced, and the
params unsharded after backward, so each step communicates once.

Checkpoints are written by every rank in parallel, each its own rows (thcore/shards.py: safetensors files and a
JSON index); they load under any engine and at any world size, and this engine also loads the eager layout:
each rank reads only the rows of its own shard.
"""
import contextlib
import copy
import glob
import json
import os
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .. import checkpoint, shards, tree, weights
from ..config import ConfigError
from ..step import loss_fn, train_step
from . import use_tf32
from ..func import bind, bind_buffers
from ..remat import blocks, checkpoint_blocks
from .runtime import Runtime

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mesh_shape(cfg, world_size: int) -> tuple[int, int]:
    """(replicate, shard): `dp_shard=0` shards over all the ranks that `dp_replicate` leaves."""
    shard = cfg.dp_shard or world_size // cfg.dp_replicate
    if cfg.dp_replicate * shard != world_size:
        raise ConfigError(f"dp_replicate={cfg.dp_replicate} x dp_shard={cfg.dp_shard or shard}: must equal the "
                          f"number of processes ({world_size})")
    return cfg.dp_replicate, shard


def _full(t):
    """A whole tensor from a DTensor (a collective: every rank calls it), a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDPEngine(Runtime):
    name = "fsdp"

    def __init__(self, cfg):
        super().__init__(cfg, "engine='fsdp'")
        replicate, shard = mesh_shape(cfg, self.world_size)
        self.start()
        self.mesh = (init_device_mesh(self.device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
                     if replicate > 1 else init_device_mesh(self.device.type, (shard,), mesh_dim_names=("shard",)))
        self.model = self.params = None

    build_device = "meta"   # the task builds the model without tensors; init draws each rank's shards

    def init(self, state):
        cfg = self.cfg
        meta = next(iter(state.params.values())).is_meta
        if not meta:   # a state made whole (e.g. from Hugging Face weights): shard the state's tensors themselves
            state = state.to(self.device)
            bind(state.model, state.params, state.buffers)
        use_tf32(self.device)
        model = state.model
        # the model's definition without tensors (meta): evaluation runs it over gathered params (eval_state)
        self._twin = copy.deepcopy(model, {id(p): nn.Parameter(p.to("meta"), p.requires_grad)
                                           for p in model.parameters()})
        dtype = _DTYPES.get(state.options.precision)
        policy = {"mesh": self.mesh, "reshard_after_forward": cfg.reshard_after_forward,
                  # low-precision compute and all-gathers, gradients reduced in fp32
                  "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype
                  else MixedPrecisionPolicy(),
                  "offload_policy": CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if cfg.offload == "cpu"
                  else None}
        policy = {k: v for k, v in policy.items() if v is not None}
        if cfg.activation_checkpointing:   # before sharding: FSDP's hooks run inside each recomputed block
            checkpoint_blocks(model)
        units = blocks(model)   # sharded one by one, found from outside: the models carry no distribution code
        # loss_fn never writes into the model's output in place: FSDP's warning about returned views is moot
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in units:
            fully_shard(block, **policy)
        fully_shard(model, **policy)
        if state.options.compile:   # per block, as torchtitan: FSDP's hooks stay outside the compiled graphs
            for block in units:
                block.compile()
        self.model = model
        self.params = dict(model.named_parameters())   # the sharded nn.Parameters: FSDP leaves .grad there
        buffers = state.buffers
        if meta:   # allocate this rank's shards only, then draw them: no rank ever holds the whole model
            model.to_empty(device=self.device)
            weights.fill_in(model, self.params, state.seed)
            buffers = {k: b.to(self.device) for k, b in buffers.items()}
            bind_buffers(model, buffers)
        # the state holds the same DTensors without the autograd leaf flag (the optimizer updates them in place)
        params = {k: p.detach() for k, p in self.params.items()}
        return state.replace(params=params, buffers=buffers, opt_state=state.tx.init(params))

    def _grads(self, state, microbatches, scale, seeds):
        """train_step's `grads_fn`: the sum over micro-batches of d(loss_sum * scale)/d(params), reduced over
        all ranks. FSDP averages over the mesh and `scale` divides by the global token count, so the loss is
        multiplied by world_size (as under DDP)."""
        for p in self.params.values():
            p.grad = None
        opts, last = state.options, len(microbatches) - 1
        loss_sum = 0.0
        for i, (mb, seed) in enumerate(zip(microbatches, seeds)):
            self.model.set_requires_gradient_sync(i == last)
            self.model.set_reshard_after_backward(i == last)
            torch.manual_seed(seed)
            # no autocast: FSDP's mixed-precision policy casts the params it gathers (the loss runs in fp32)
            ls, _ = loss_fn(self.model, {}, {}, mb, opts.label_smoothing)
            (ls * (scale * self.world_size)).backward()
            loss_sum = loss_sum + ls.detach()
        return {k: p.grad for k, p in self.params.items()}, loss_sum

    def step(self, state, batch):
        state, metrics = train_step(state, batch, donate=True, grads_fn=self._grads, sum_fn=self.reduce_sum,
                                    stream=self.rank)   # per-rank dropout masks
        # norms over sharded tensors come back as replicated DTensors: the loop reads plain tensors
        return state, {k: v.to_local() if isinstance(v, DTensor) else v for k, v in metrics.items()}

    def num_params(self, state) -> int:
        return sum(p.numel() for p in state.params.values())   # a DTensor's numel is the whole tensor's

    @contextlib.contextmanager
    def eval_state(self, state):
        """Evaluation and decoding run the model functionally over whole params: gathered for the duration."""
        yield state.replace(model=self._twin, params={k: _full(p) for k, p in state.params.items()})

    # -- checkpoints: every rank writes its own shards (thcore/shards.py) --------------------------------------
    def save(self, state, run_dir, keep=3, extra=None):
        """Every rank writes (and hashes) its rows into one staging directory; rank 0 adds the index, state.json
        and the manifest and moves it into place as checkpoint.save does (atomically, `latest` last)."""
        root = checkpoint.root_of(run_dir)
        staging = os.path.join(root, f".fsdp-step_{state.step}")
        if self.is_main:
            for old in glob.glob(os.path.join(root, ".fsdp-step_*")):   # left by a killed save
                shutil.rmtree(old, ignore_errors=True)
            os.makedirs(staging)
        dist.barrier()
        part = shards.write(staging, {"model": state.params, "optimizer": tree.flatten(state.opt_state)},
                            self.rank, self.world_size)
        mine = {f for tensors in part.values() for v in tensors.values() for f, *_ in v["parts"]}
        entries = {f: checkpoint.file_entry(os.path.join(staging, f)) for f in mine}
        every = [None] * self.world_size
        dist.all_gather_object(every, (part, entries))   # small: names, row ranges, checksums
        if self.is_main:
            with open(os.path.join(staging, shards.INDEX), "w") as f:
                json.dump(shards.merge([p for p, _ in every]), f, indent=1)
            files = {n: (lambda dst, src=os.path.join(staging, n): os.replace(src, dst)) for n in os.listdir(staging)}
            checkpoint.save(state, run_dir, keep=keep, extra=extra, write_tensors=False, files=files,
                                   known={k: v for _, e in every for k, v in e.items()})
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()   # nobody reads or prunes checkpoints while rank 0 writes one
        return checkpoint.step_dir(run_dir, state.step)   # on every rank: error messages name it alike

    def _load(self, state, ckpt):
        """Each rank reads just its rows of every tensor (a sharded checkpoint of any world size, or the eager
        layout), after verifying the files it reads."""
        reader = shards.Reader(ckpt)
        trees = {"model": state.params, "optimizer": tree.flatten(state.opt_state)}
        for kind, like in trees.items():
            checkpoint.check_fits(ckpt, f"{kind} tensor", {k: reader.shape(kind, k) for k in reader.names(kind)},
                                  like)
        need = {f for kind, like in trees.items()
                for f in reader.files(kind, like, lambda k, like=like: shards.local_rows(like[k]))}
        checkpoint.verify(ckpt, only=need | {"state.json", shards.INDEX})
        meta = checkpoint.read_meta(ckpt, state)
        with torch.no_grad():
            for kind, like in trees.items():
                for k, t in like.items():
                    local = t.to_local() if isinstance(t, DTensor) else t
                    local.copy_(reader.read(kind, k, *shards.local_rows(t)) if t.dim() else reader.read(kind, k))
        return state.with_meta(meta), meta

    def restore(self, state, paths):
        """The newest checkpoint among `paths` that every rank finds complete (each checks what it reads; a
        damaged one is named in one warning line and skipped); a complete one of another model is an error."""
        for p in paths:
            error = incompatible = None
            try:
                new, meta = self._load(state, p)
            except checkpoint.IncompatibleCheckpoint as e:
                incompatible = str(checkpoint.incompatible(e, self.cfg.resume))
            except checkpoint.CheckpointError as e:
                error = str(e)
            every = [None] * self.world_size
            dist.all_gather_object(every, (error, incompatible))
            bad = next((i for _, i in every if i), None)
            if bad:
                raise checkpoint.IncompatibleCheckpoint(bad)
            damaged = next((e for e, _ in every if e), None)
            if damaged is None:
                return new, meta, p
            if self.is_main:
                print(f"warning: skipping checkpoint: {damaged}", file=sys.stderr)
        if paths:   # never silently start over (and later prune) a run whose checkpoints all fail to load
            raise checkpoint.none_complete(paths, self.cfg.resume)
        return state, None, None

    def _drop(self):
        self.model = self.params = None
