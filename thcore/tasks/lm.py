"""Language modelling: a GPT on prepared token memmaps (nanoGPT's train.py, as a task for the fit loop).

    python th.py prepare --input=text.txt --out=data/x --tokenizer=char     # or gpt2 --tokenizer_dir=...
    python th.py run recipes/gpt2_shakespeare_char_cpu.py --data_dir=data/x

The data pipeline is tasks/lm_data.py. Training batches are random windows (data/lm.py); an "epoch" is as many micro-batches as it takes to draw
every training token once in expectation, so `epochs` still means something and the loop's cursor
{"epoch", "index"} names each batch: batch `index` of `epoch` on `rank` is a function of the seed alone.
Evaluation estimates val and train loss over `eval_iters` fixed batches each, split over ranks and summed.
"""
import os

import attrs
import torch
from safetensors import safe_open

from .. import checkpoint, optim
from ..config import Config, ConfigError, _non_negative, _positive, _unit, field
from ..data.loader import to_device
from ..interop import hf_gpt2
from ..models.gpt import GPT, GPTConfig
from ..remat import checkpoint_blocks
from ..scores import perplexity
from ..state import StepOptions, init_state, speed_options
from ..step import eval_step
from . import Task, eval_device, lm_data, same

BPE_MULTIPLE = 64   # vocab_multiple=0 pads GPT-2 BPE vocabularies to this (50257 -> 50304, as nanoGPT)


def _weights(inst, attr, value):
    for k, w in value.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0:
            raise ConfigError(f"datasets[{k!r}]={w!r}: weights must be numbers > 0")


@attrs.define(kw_only=True)
class LMConfig(Config):
    # model: nanoGPT's names; defaults are nanoGPT's shakespeare_char model
    n_layer: int = field(6, "transformer blocks", "model", _positive)
    n_head: int = field(6, "attention heads", "model", _positive)
    n_embd: int = field(384, "model width", "model", _positive)
    block_size: int = field(256, "context length in tokens", "model", _positive)
    dropout: float = field(0.2, "dropout rate", "model", _unit)
    bias: bool = field(False, "biases in Linear and LayerNorm (GPT-2 has them; nanoGPT trains without)", "model")
    vocab_size: int = field(0, "0 = the data's (meta.json)", "model", _non_negative)
    vocab_multiple: int = field(0, "token embedding / output layer rows padded to a multiple of this (the logits "
                                   "stay vocab_size wide); 0 = 64 for GPT-2 BPE data, 1 (none) otherwise",
                                "model", _non_negative)
    # data: a directory made by `th.py prepare`, or a weighted mix of several {data_dir: weight}
    data_dir: str = field("", "a directory made by `th.py prepare` (train.bin, val.bin, meta.json)", "data")
    datasets: dict = field(help="a weighted mix {data_dir: weight, ...}; replaces data_dir", group="data",
                           validator=_weights, factory=dict)
    eval_iters: int = field(200, "batches per loss estimate (val, and train)", "logging/eval", _positive)
    # where to start: "" = random init; a Hugging Face GPT-2 dir, a run dir or a checkpoint dir (fresh optimizer)
    init_from: str = field("", "start from these weights: a Hugging Face GPT-2 dir, a run dir or a checkpoint "
                               "(fresh optimizer)", "model")
    # optimizer and schedule: nanoGPT's
    lr: float = 1e-3
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    eval_every: int = 250
    log_every: int = 10

    def validate(self):
        super().validate()
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.num_workers:   # a batch is a random window of a memory map: nothing for a worker to do
            raise ConfigError(f"num_workers={self.num_workers}: the GPT task draws its windows from memory-mapped "
                              "tokens in the training process; use 0")
        if not self.data_dir and not self.datasets:
            raise ConfigError("data_dir: required (a directory made by `python th.py prepare`), or give datasets")


class LMTask(Task):
    """Model construction and evaluation for one LM config; the data pipeline (sources, windows, evaluation
    batches) is tasks/lm_data.py, perplexity scores.py."""

    def __init__(self, cfg: LMConfig, log=print):
        self.cfg, self.log = cfg, log
        meta = lm_data.read_meta(cfg)
        self.model_config = self._keep_saved_layout(cfg, model_config(cfg, meta))
        m = self.model_config
        if meta["vocab_size"] > m.vocab_size:
            raise ConfigError(f"vocab_size={m.vocab_size}: the data has {meta['vocab_size']} tokens")
        self.data = lm_data.LMData(cfg, meta, m.block_size)
        self.train, self.val = self.data.train, self.data.val
        self.summary = (f"{self.data.summary} | vocab {m.vocab_size} ({meta['tokenizer']['kind']})"
                        + (f", {m.rows} rows" if m.rows != m.vocab_size else "") + f" | GPT {m.n_layer} layers, "
                        f"{m.n_head} heads, {m.n_embd} wide, block {m.block_size}"
                        + (f" | from {cfg.init_from}" if cfg.init_from else ""))

    @property
    def model_args(self) -> GPTConfig:
        """The model config by its earlier name (a mapping of its fields, as model_args was)."""
        return self.model_config

    def _keep_saved_layout(self, cfg, m: GPTConfig) -> GPTConfig:
        """Resuming a checkpoint written without vocabulary padding (before it was the default): the run keeps
        its unpadded rows, so it goes on with exactly the numbers it had (checkpoints load only into the shape
        that wrote them). A new run from those weights (init_from) is padded on read."""
        saved = next((r for r in map(_saved_rows, checkpoint.resolve(cfg.resume, cfg.run_dir)) if r), None)
        if saved != m.vocab_size or m.rows == saved:
            return m
        if cfg.vocab_multiple > 1:
            raise ConfigError(f"vocab_multiple={cfg.vocab_multiple}: the checkpoint to resume holds {saved} "
                              "unpadded token rows; resume it with vocab_multiple=1, or start a new run from its "
                              "weights with init_from (padded on read)")
        self.log(f"note: the checkpoint to resume holds {saved} token rows (written without vocabulary padding): "
                 f"this run keeps them (vocab_multiple=1); init_from pads them to {m.rows} in a new run")
        return m.replace(vocab_multiple=1)

    def save_assets(self, run_dir: str):
        """model.json (the GPTConfig) and the tokenizer: what export and generate read."""
        self.data.save_assets(run_dir)
        hf_gpt2.write_model_json(run_dir, self.model_config)

    def build_model(self) -> GPT:
        model = self.model_config.build()
        return checkpoint_blocks(model) if self.cfg.activation_checkpointing else model

    def init_state(self, total_steps: int, device="cpu"):
        c = self.cfg
        init_from = c.init_from and not checkpoint.resolve(c.resume, c.run_dir)   # resuming: the checkpoint wins
        state = init_state(self.build_model, optim.make_optimizer(c), seed=c.seed,
                           device="cpu" if init_from and torch.device(device).type == "meta" else device,
                           lr=optim.run_schedule(c, total_steps),
                           options=StepOptions(precision=c.precision, clip_grad=c.clip_grad,
                                              label_smoothing=c.label_smoothing, **speed_options(c)))
        if init_from:   # Hugging Face's weights, whole: an engine that builds on meta shards them instead
            _, params, src = hf_gpt2.load_gpt(c.init_from, vocab_multiple=self.model_config.vocab_multiple)
            params["transformer.wpe.weight"] = params["transformer.wpe.weight"][:c.block_size]   # nanoGPT's crop
            for k, p in state.params.items():
                if k not in params or params[k].shape != p.shape:
                    raise ConfigError(f"init_from: {src}: {k} missing or of another shape")
                p.copy_(params[k])   # the optimizer state is fresh (zeros): a new run from these weights
            self.log(f"init_from: weights of {src}")
        return state

    # -- batches ------------------------------------------------------------------------------------------
    def batches_per_epoch(self, world: int) -> int:
        return self.data.batches_per_epoch(world)

    def train_loader(self, epoch: int, start: int, engine):
        for i in range(start, self.batches_per_epoch(engine.world_size)):
            yield self.data.train_batch(epoch, i, engine.rank)

    # -- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, state, split: str = "valid", *, reduce_sum=same, rank: int = 0, world_size: int = 1,
                 device=None) -> dict:
        """Val loss (and ppl) and a train-loss estimate, each over the same `eval_iters` batches every time
        (so evals compare like with like), split over ranks and summed: every rank calls reduce_sum once."""
        if split != "valid":
            return {}
        c, device = self.cfg, eval_device(state, device)
        sums = torch.zeros(4, dtype=torch.float64, device=device)   # val loss, tokens; train loss, tokens
        for i in range(rank, c.eval_iters, world_size):
            for j, batch in enumerate(self.data.eval_batches(i)):
                loss_sum, ntok = eval_step(state, to_device(batch, device))
                sums[2 * j] += loss_sum.double()
                sums[2 * j + 1] += ntok.double()
        val_loss, val_tok, train_loss, train_tok = reduce_sum(sums).tolist()
        loss = val_loss / max(val_tok, 1)
        return {"loss": loss, "ppl": perplexity(loss), "train_loss": train_loss / max(train_tok, 1)}


def model_config(cfg: LMConfig, meta: dict) -> GPTConfig:
    """The GPT of `cfg`, made once from the recipe's fields: its shape from the config, or from `init_from` (its
    shape wins; block_size may crop it); the vocabulary padded as `vocab_multiple` says (init_from's weights are
    padded or cropped to it on load)."""
    multiple = cfg.vocab_multiple or (BPE_MULTIPLE if meta["tokenizer"]["kind"] == "gpt2" else 1)
    if cfg.init_from:
        shape = _peek_shape(cfg.init_from)
        if cfg.block_size > shape.block_size:
            raise ConfigError(f"block_size={cfg.block_size}: init_from {cfg.init_from} has {shape.block_size} positions")
        return shape.replace(block_size=cfg.block_size, vocab_multiple=multiple, dropout=cfg.dropout)
    return GPTConfig(vocab_size=cfg.vocab_size or meta["vocab_size"], block_size=cfg.block_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, vocab_multiple=multiple)


def _saved_rows(ckpt: str) -> int | None:
    """Token-embedding rows saved in checkpoint dir `ckpt`, from the file headers (None when nothing says: a
    damaged checkpoint, which the restore skips with a warning)."""
    key = "transformer.wte.weight"
    if not checkpoint.has_params(ckpt):   # DeepSpeed's own files: the model.json of its run says
        try:
            return hf_gpt2.read_model_json(hf_gpt2.run_of(ckpt)).rows
        except (OSError, ValueError, TypeError, ConfigError):
            return None
    try:
        if checkpoint.is_sharded(ckpt):
            from ..shards import Reader
            return Reader(ckpt).shape("model", key)[0]
        with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
            return f.get_slice(key).get_shape()[0]
    except Exception:   # unreadable here means unreadable for the restore too: it names the file
        return None


def _peek_shape(path: str) -> GPTConfig:
    """The GPTConfig of an init_from directory without reading its weights."""
    if hf_gpt2.is_hf_dir(path):
        return hf_gpt2.read_hf_config(path)
    run = hf_gpt2.run_of(path)
    if not os.path.isfile(os.path.join(run, hf_gpt2.MODEL_JSON)):
        raise ConfigError(f"init_from={path!r}: neither a Hugging Face GPT-2 directory nor a GPT run directory")
    return hf_gpt2.read_model_json(run)
