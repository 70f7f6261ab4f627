"""Translation: the encoder-decoder Transformer on a parallel corpus (or the built-in demo task)."""
import os

import attrs
import torch

from .. import decode, optim
from ..config import Config, ConfigError, _non_negative, _positive, _unit, _choice
from ..data import demo
from ..data.loader import epoch_batches, make_loader, to_device
from ..data.translation import PairDataset, collate, read_parallel
from ..data.vocab import BOS, EOS, Vocab
from ..models import Transformer
from ..state import StepOptions, init_state
from ..step import eval_step

_FILES = ("train_src", "train_tgt", "valid_src", "valid_tgt", "test_src", "test_tgt")


@attrs.define(kw_only=True)
class TranslationConfig(Config):
    # model: defaults are the paper's base Transformer
    d_model: int = attrs.field(default=512, validator=_positive)
    num_heads: int = attrs.field(default=8, validator=_positive)
    num_encoder_layers: int = attrs.field(default=6, validator=_positive)
    num_decoder_layers: int = attrs.field(default=6, validator=_positive)
    d_ff: int = attrs.field(default=2048, validator=_positive)
    dropout: float = attrs.field(default=0.1, validator=_unit)
    activation: str = attrs.field(default="relu", validator=_choice("relu", "gelu"))
    pre_ln: bool = False
    tie_embeddings: bool = False
    # data: line-aligned files, or the built-in demo task when train_src is empty
    train_src: str = ""
    train_tgt: str = ""
    valid_src: str = ""
    valid_tgt: str = ""
    test_src: str = ""
    test_tgt: str = ""
    min_freq: int = attrs.field(default=1, validator=_positive)
    max_len: int = attrs.field(default=100, validator=_positive)     # tokens, eos included
    demo_train_size: int = attrs.field(default=20000, validator=_positive)
    demo_valid_size: int = attrs.field(default=1000, validator=_positive)
    demo_test_size: int = attrs.field(default=1000, validator=_positive)
    eval_batch_size: int = attrs.field(default=250, validator=_positive)
    eval_max_sentences: int = attrs.field(default=0, validator=_non_negative)   # 0 = whole split
    label_smoothing: float = attrs.field(default=0.1, validator=_unit)
    beta2: float = 0.98
    warmup_steps: int = 400

    def validate(self):
        super().validate()
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        for a, b in (("train_src", "train_tgt"), ("valid_src", "valid_tgt"), ("test_src", "test_tgt")):
            if bool(getattr(self, a)) != bool(getattr(self, b)):
                given, missing = (a, b) if getattr(self, a) else (b, a)
                raise ConfigError(f"{missing}: required when {given} is given")
        if self.valid_src and not self.train_src:
            raise ConfigError("train_src: required when valid_src is given (the vocabulary comes from train)")


class TranslationTask:
    """Data, model definition and evaluation for one translation config."""

    def __init__(self, cfg: TranslationConfig, log=print):
        self.cfg = cfg
        self.splits, skipped = self._read(cfg)
        src_vocab_path = os.path.join(cfg.run_dir, "vocab.src.json")
        tgt_vocab_path = os.path.join(cfg.run_dir, "vocab.tgt.json")
        if cfg.resume != "never" and os.path.isfile(src_vocab_path) and os.path.isfile(tgt_vocab_path):
            # resuming: the run's own vocabularies, so ids match its checkpoints
            self.src_vocab, self.tgt_vocab = Vocab.load(src_vocab_path), Vocab.load(tgt_vocab_path)
        else:
            src, tgt = self.splits["train"]
            self.src_vocab = Vocab.build((s.split() for s in src), cfg.min_freq)
            self.tgt_vocab = Vocab.build((t.split() for t in tgt), cfg.min_freq)
        self.data = {name: PairDataset(s, t, self.src_vocab, self.tgt_vocab, cfg.max_len)
                     for name, (s, t) in self.splits.items()}
        if not len(self.data["train"]):
            raise ConfigError(f"max_len={cfg.max_len}: every training pair is longer; raise max_len")
        self.log = log
        self.summary = (f"data: {'demo task' if not cfg.train_src else cfg.train_src} | "
                        + " | ".join(f"{k} {len(v)} pairs" + (f" ({v.dropped} over max_len dropped)" if v.dropped else "")
                                     for k, v in self.data.items())
                        + (f" | {skipped} empty lines skipped" if skipped else "")
                        + f" | vocab src {len(self.src_vocab)} tgt {len(self.tgt_vocab)}")

    @staticmethod
    def _read(cfg):
        if not cfg.train_src:
            return demo.splits(cfg.demo_train_size, cfg.demo_valid_size, cfg.demo_test_size, seed=0), 0
        out, skipped = {}, 0
        for name in ("train", "valid", "test"):
            if getattr(cfg, f"{name}_src"):
                s, t, n = read_parallel(getattr(cfg, f"{name}_src"), getattr(cfg, f"{name}_tgt"),
                                        f"{name}_src", f"{name}_tgt")
                out[name], skipped = (s, t), skipped + n
        return out, skipped

    def save_assets(self, run_dir: str):
        self.src_vocab.save(os.path.join(run_dir, "vocab.src.json"))
        self.tgt_vocab.save(os.path.join(run_dir, "vocab.tgt.json"))

    def build_model(self) -> Transformer:
        c = self.cfg
        return Transformer(len(self.src_vocab), len(self.tgt_vocab), d_model=c.d_model, num_heads=c.num_heads,
                           num_encoder_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers,
                           d_ff=c.d_ff, dropout=c.dropout, max_len=c.max_len + 1, activation=c.activation,
                           pre_ln=c.pre_ln, tie_embeddings=c.tie_embeddings,
                           activation_checkpointing=c.activation_checkpointing)

    def init_state(self, total_steps: int, device="cpu"):
        c = self.cfg
        return init_state(self.build_model, optim.make_optimizer(c), seed=c.seed, device=device,
                          lr=optim.schedule(c.lr_schedule, c.lr, c.warmup_steps, total_steps, c.min_lr_ratio),
                          options=StepOptions(precision=c.precision, clip_grad=c.clip_grad,
                                              label_smoothing=c.label_smoothing, compile=c.compile))

    # -- batches ------------------------------------------------------------------------------------------
    def batches_per_epoch(self, world: int) -> int:
        return len(self.data["train"]) // world // self.cfg.batch_size

    def train_loader(self, epoch: int, start: int, engine):
        batches = epoch_batches(self.data["train"], self.cfg.batch_size, epoch, self.cfg.seed,
                                engine.rank, engine.world_size)[start:]
        return make_loader(self.data["train"], batches, collate, self.cfg.num_workers, engine.device)

    def tokens(self, batch) -> torch.Tensor:
        return (batch["targets"] != -100).sum()

    # -- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, state, engine, split: str = "valid") -> dict:
        """Token-level loss and greedy exact match over the whole split, summed across ranks."""
        data = self.data.get(split)
        if data is None or not len(data):
            return {}
        n = len(data) if not self.cfg.eval_max_sentences else min(len(data), self.cfg.eval_max_sentences)
        mine = list(range(engine.rank, n, engine.world_size))
        bs = self.cfg.eval_batch_size
        sums = torch.zeros(4, dtype=torch.float64, device=engine.device)   # loss, tokens, exact, sentences
        state.model.eval()
        try:
            for i in range(0, len(mine), bs):
                batch = to_device(collate([data[j] for j in mine[i:i + bs]]), engine.device)
                loss_sum, ntok = eval_step(state, batch)
                hyp = decode.greedy(state.model, state.params, state.buffers, batch["src"], BOS,
                                    max_len=self.cfg.max_len)
                exact = sum(decode.strip(h) == data[j][1].tolist() for h, j in zip(hyp, mine[i:i + bs]))
                sums += torch.tensor([loss_sum.item(), ntok.item(), exact, len(hyp)], dtype=torch.float64,
                                     device=engine.device)
        finally:
            state.model.train()
        loss, ntok, exact, count = engine.reduce_sum(sums).tolist()
        return {"loss": loss / max(ntok, 1), "exact_match": exact / max(count, 1)}

    def translate(self, state, lines: list[str], device="cpu") -> list[str]:
        """Greedy translations of whitespace-tokenized source lines."""
        src = [torch.tensor(self.src_vocab.encode(line.split()) + [EOS]) for line in lines]
        batch = collate([(s, torch.zeros(0, dtype=torch.long)) for s in src])
        state.model.eval()
        try:
            hyp = decode.greedy(state.model, state.params, state.buffers, batch["src"].to(device), BOS,
                                max_len=self.cfg.max_len)
        finally:
            state.model.train()
        return [" ".join(self.tgt_vocab.decode(h)) for h in hyp]
