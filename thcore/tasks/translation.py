"""Translation: the encoder-decoder Transformer on a parallel corpus (or the built-in demo task)."""
import json
import os

import attrs
import torch

from .. import decode, optim
from ..config import Config, ConfigError, _choice, _non_negative, _positive, _unit, field
from ..data.loader import epoch_batches, make_loader, to_device, token_batches
from ..data.translation import SPLITS, collate
from ..data.vocab import EOS
from ..models import Transformer, TransformerConfig
from ..remat import checkpoint_blocks
from ..scores import BLEU_TOKENIZERS, bleu_tokenizer, corpus_scores, signatures
from ..state import StepOptions, init_state, speed_options
from ..step import eval_step
from . import Task, eval_device, same, translation_data

@attrs.define(kw_only=True)
class TranslationConfig(Config):
    # model: defaults are the paper's base Transformer
    d_model: int = field(512, "model width", "model", _positive)
    num_heads: int = field(8, "attention heads", "model", _positive)
    num_encoder_layers: int = field(6, "encoder blocks", "model", _positive)
    num_decoder_layers: int = field(6, "decoder blocks", "model", _positive)
    d_ff: int = field(2048, "feed-forward width", "model", _positive)
    dropout: float = field(0.1, "dropout rate", "model", _unit)
    activation: str = field("relu", "feed-forward activation: relu | gelu", "model", _choice("relu", "gelu"))
    pre_ln: bool = field(False, "LayerNorm before each sub-layer (False: after, as in the paper)", "model")
    tie_embeddings: bool = field(False, "the output layer is the target embedding", "model")
    share_embeddings: bool = field(False, "one embedding table for source and target (needs joint_vocab)", "model")
    # data: DATA_DIR/{train,valid,test}.{src_lang,tgt_lang}, or line-aligned files named one by one,
    # or the built-in demo task when neither is given
    data_dir: str = field("", "directory of {train,valid,test}.{src_lang,tgt_lang} ('' with no files: the demo)",
                          "data")
    src_lang: str = field("en", "source file suffix (language code)", "data")
    tgt_lang: str = field("de", "target file suffix (language code; picks the BLEU tokenizer)", "data")
    train_src: str = field("", "training source file (one sentence per line)", "data")
    train_tgt: str = field("", "training target file, line-aligned with train_src", "data")
    valid_src: str = field("", "validation source file", "data")
    valid_tgt: str = field("", "validation target file", "data")
    test_src: str = field("", "test source file", "data")
    test_tgt: str = field("", "test target file", "data")
    tokenizer: str = field("word", "word | bpe | unigram (subwords from the `tokenizers` library)", "data",
                           _choice("word", "bpe", "unigram"))
    vocab_size: int = field(8000, "bpe / unigram vocabulary size, per tokenizer", "data", _positive)
    joint_vocab: bool = field(False, "one vocabulary trained on both sides", "data")
    min_freq: int = field(1, "word tokenizer: words seen fewer times become <unk>", "data", _positive)
    max_tokens: int = field(0, "> 0: batches of at most this many padded tokens per process (length buckets); "
                               "0: batch_size sentences", "data", _non_negative)
    max_len: int = field(100, "longest sentence in tokens, eos included (longer training pairs are dropped)",
                         "data", _positive)
    prepared: str = field("", "a directory made by `th.py prepare --task=translation`, read memory-mapped on "
                              "every rank (nothing trained or encoded); replaces data_dir and the file fields", "data")
    tokenizer_sample: int = field(1_000_000, "the tokenizer trains on at most this many training pairs, evenly "
                                             "spread (0 = all)", "data", _non_negative)
    demo_train_size: int = field(20000, "demo task: training pairs", "data", _positive)
    demo_valid_size: int = field(1000, "demo task: validation pairs", "data", _positive)
    demo_test_size: int = field(1000, "demo task: test pairs", "data", _positive)
    eval_batch_size: int = field(250, "sentences per evaluation / decoding batch", "logging/eval", _positive)
    eval_max_sentences: int = field(0, "validation scores the first N sentences; 0 = all (test: always all)",
                                    "logging/eval", _non_negative)
    label_smoothing: float = 0.1
    beta2: float = 0.98
    warmup_steps: int = 400
    # decoding: validation during training, the test split at the end, and `th.py translate/eval` defaults
    eval_beam: int = field(1, "beam size of validation (1 = greedy)", "logging/eval", _positive)
    test_beam: int = field(1, "beam size of the test split and of th.py translate/eval", "logging/eval",
                           _positive)
    length_penalty: float = field(1.0, "beam scores are divided by length ** length_penalty", "logging/eval",
                                  _non_negative)
    max_len_ratio: float = field(1.5, "outputs stop at ratio x source length + 10 tokens", "logging/eval",
                                 _non_negative)
    bleu_tokenize: str = field("auto", "sacrebleu tokenizer: auto (from tgt_lang: zh, ja-mecab, ko-mecab, else "
                                       "13a) | 13a | zh | char | intl | none | ...", "logging/eval",
                               _choice(*BLEU_TOKENIZERS))

    def __attrs_post_init__(self):
        if self.data_dir:   # fill the file fields not given one by one
            for split in ("train", "valid", "test"):
                for side, lang in (("src", self.src_lang), ("tgt", self.tgt_lang)):
                    path = os.path.join(self.data_dir, f"{split}.{lang}")
                    if not getattr(self, f"{split}_{side}") and (split == "train" or os.path.isfile(path)):
                        setattr(self, f"{split}_{side}", path)
        super().__attrs_post_init__()

    def validate(self):
        super().validate()
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise ConfigError(f"data_dir={self.data_dir!r}: not a directory")
        if self.share_embeddings and not self.joint_vocab:
            raise ConfigError("share_embeddings=True: needs joint_vocab=True (one vocabulary for both sides)")
        if self.max_tokens and self.max_tokens < self.max_len:
            raise ConfigError(f"max_tokens={self.max_tokens}: must be >= max_len={self.max_len} "
                              "(a batch must hold the longest pair)")
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if self.cuda_graphs:   # each new batch shape would record (and keep) a graph of its own
            raise ConfigError("cuda_graphs=True: translation batches vary in shape (sentence lengths), and CUDA "
                              "graphs record one graph per shape; use compile=True")
        for a, b in (("train_src", "train_tgt"), ("valid_src", "valid_tgt"), ("test_src", "test_tgt")):
            if bool(getattr(self, a)) != bool(getattr(self, b)):
                given, missing = (a, b) if getattr(self, a) else (b, a)
                raise ConfigError(f"{missing}: required when {given} is given")
        if self.valid_src and not self.train_src:
            raise ConfigError("train_src: required when valid_src is given (the vocabulary comes from train)")


class TranslationTask(Task):
    """Model definition, batches, decoding and evaluation for one translation config; the data pipeline (splits,
    tokenizers, the prepared corpus) is tasks/translation_data.py, the scores scores.py."""

    def __init__(self, cfg: TranslationConfig, log=print, splits=None):
        """`splits`: read only these (e.g. ("test",) to evaluate a finished run, whose vocabularies are then
        read from its run directory); None = all, for training."""
        self.cfg = cfg
        d = translation_data.read(cfg, SPLITS if splits is None else splits, training=splits is None, log=log)
        # the data pipeline's results (tasks/translation_data.py:TranslationData)
        self.prepared, self.splits, self.data, skipped = d.prepared, d.splits, d.data, d.skipped
        self.src_vocab, self.tgt_vocab = d.src_vocab, d.tgt_vocab
        if splits is None and not len(self.data["train"]):
            raise ConfigError(f"max_len={cfg.max_len}: every training pair is longer; raise max_len")
        self._log = log   # the sacrebleu signatures, after a test evaluation
        self.bleu_tokenize, bleu_warning = bleu_tokenizer(cfg.bleu_tokenize, cfg.tgt_lang)
        self.signatures = signatures(self.bleu_tokenize)
        warnings = [bleu_warning] if bleu_warning else []
        if splits is None:   # training: say which scores the run will not have
            warnings += [f"warning: no {name} split ({name}_src / {name}_tgt{f' in {cfg.data_dir}' if cfg.data_dir else ''}"
                         f"): the run reports no {name} scores"
                         for name in ("valid", "test") if name not in self.data]
        vocab = (f"joint vocab {len(self.tgt_vocab)}" if cfg.joint_vocab else
                 f"vocab src {len(self.src_vocab)} tgt {len(self.tgt_vocab)}")
        self.summary = (f"data: {self.prepared or ('demo task' if not cfg.train_src else cfg.train_src)} | "
                        + " | ".join(f"{k} {len(v)} pairs" + (f" ({v.dropped} over max_len dropped)" if v.dropped else "")
                                     for k, v in self.data.items())
                        + (f" | {skipped} empty lines skipped" if skipped else "")
                        + f" | {cfg.tokenizer} {vocab}"
                        + (f" | batches of <= {cfg.max_tokens} padded tokens per process" if cfg.max_tokens else "")
                        + f" | BLEU tokenize {self.bleu_tokenize}"
                        + "".join("\n" + w for w in warnings))
        self.warnings = warnings
        self.model_config = model_config(cfg, len(self.src_vocab), len(self.tgt_vocab))

    def save_assets(self, run_dir: str):
        """The vocabularies, which `th.py translate/eval` and a resumed run read back."""
        if self.cfg.joint_vocab:
            self.tgt_vocab.save(os.path.join(run_dir, "vocab.joint.json"))
        else:
            self.src_vocab.save(os.path.join(run_dir, "vocab.src.json"))
            self.tgt_vocab.save(os.path.join(run_dir, "vocab.tgt.json"))
        with open(os.path.join(run_dir, "sacrebleu.json"), "w") as f:   # how the run's BLEU / chrF are computed
            json.dump(self.signatures, f, indent=1)

    def build_model(self) -> Transformer:
        model = self.model_config.build()
        return checkpoint_blocks(model) if self.cfg.activation_checkpointing else model

    def init_state(self, total_steps: int, device="cpu"):
        c = self.cfg
        return init_state(self.build_model, optim.make_optimizer(c), seed=c.seed, device=device,
                          lr=optim.run_schedule(c, total_steps),
                          options=StepOptions(precision=c.precision, clip_grad=c.clip_grad,
                                              label_smoothing=c.label_smoothing, **speed_options(c)))

    # -- batches ------------------------------------------------------------------------------------------
    def _batches(self, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        train = self.data["train"]
        if self.cfg.max_tokens:
            return token_batches(train.sizes(), self.cfg.max_tokens, epoch, self.cfg.seed, rank, world)
        return epoch_batches(train, self.cfg.batch_size, epoch, self.cfg.seed, rank, world)

    def batches_per_epoch(self, world: int) -> int:
        if self.cfg.max_tokens:   # the same for every epoch (see token_batches)
            return len(self._batches(0, 0, world))
        return len(self.data["train"]) // world // self.cfg.batch_size

    def train_loader(self, epoch: int, start: int, engine):
        batches = self._batches(epoch, engine.rank, engine.world_size)[start:]
        return make_loader(self.data["train"], batches, collate, self.cfg.num_workers, engine.device)

    def per_rank_batch(self) -> tuple[int, str]:
        if self.cfg.max_tokens:   # batches by padded tokens, not sentences
            return self.cfg.max_tokens, "padded tokens at most"
        return self.cfg.batch_size, ""

    # -- evaluation ---------------------------------------------------------------------------------------
    def _decode_batches(self, srcs: list[torch.Tensor], rows: list[int]) -> list[list[int]]:
        """`rows` of `srcs` in batches of similar length (less padding, earlier stop), eval_batch_size each."""
        order = sorted(rows, key=lambda i: len(srcs[i]))
        bs = self.cfg.eval_batch_size
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    def hypotheses(self, state, srcs: list[torch.Tensor], beam: int, device, rows=None) -> dict:
        """{row: token ids} translating the source id tensors `srcs` (each ending in eos)."""
        c, out = self.cfg, {}
        state.model.eval()
        try:
            for idx in self._decode_batches(srcs, list(range(len(srcs))) if rows is None else rows):
                src = collate([(srcs[i], torch.zeros(0, dtype=torch.long)) for i in idx])["src"].to(device)
                hyp = decode.translate(state.model, state.params, state.buffers, src, beam, c.max_len,
                                       c.max_len_ratio, c.length_penalty)
                out.update(zip(idx, hyp))
        finally:
            state.model.train()
        return out

    def evaluate(self, state, split: str = "valid", *, reduce_sum=same, rank: int = 0, world_size: int = 1,
                 device=None, beam: int | None = None) -> dict:
        """Token-level loss, exact match and sacrebleu BLEU / chrF of the detokenized translations against the
        split's reference lines (greedy, or beam search with eval_beam / test_beam); this rank scores every
        world_size-th sentence and `reduce_sum` adds the ranks up."""
        data = self.data.get(split)
        if data is None or not len(data):
            return {}
        c, device = self.cfg, eval_device(state, device)
        beam = beam or (c.test_beam if split == "test" else c.eval_beam)
        # a cheaper validation on the first sentences; the test split is always scored whole
        n = len(data) if not c.eval_max_sentences or split == "test" else min(len(data), c.eval_max_sentences)
        mine = list(range(rank, n, world_size))
        sums = torch.zeros(4, dtype=torch.float64, device=device)   # loss, tokens, exact, sentences
        state.model.eval()
        try:
            for idx in self._decode_batches([data[j][0] for j in range(len(data))], mine):
                batch = to_device(collate([data[j] for j in idx]), device)
                loss_sum, ntok = eval_step(state, batch)
                sums[:2] += torch.tensor([loss_sum.item(), ntok.item()], dtype=torch.float64, device=device)
        finally:
            state.model.train()
        hyp = self.hypotheses(state, [p[0] for p in data.pairs], beam, device, mine)
        exact = sum(hyp[j] == data[j][1].tolist() for j in mine)
        sums[2:] += torch.tensor([exact, len(mine)], dtype=torch.float64, device=device)
        loss, ntok, exact, count = reduce_sum(sums).tolist()
        # every rank gets every hypothesis (row j: its length, then its ids; one rank fills each row), so the
        # corpus scores are sacrebleu's own on the whole split, whatever the number of ranks
        ids = torch.zeros(n, c.max_len + 1, dtype=torch.long)
        for j in mine:
            ids[j, 0] = len(hyp[j])
            ids[j, 1:1 + len(hyp[j])] = torch.tensor(hyp[j], dtype=torch.long)
        ids = reduce_sum(ids.to(device)).cpu()
        hyps = [self.tgt_vocab.decode(row[1:1 + row[0]].tolist()) for row in ids]
        refs = self.splits[split][1]
        scores = corpus_scores(hyps, [refs[data.kept[j]] for j in range(n)], self.bleu_tokenize)
        self.signatures = {"tokenize": self.bleu_tokenize,
                           **{k: scores.pop(k) for k in ("bleu_signature", "chrf_signature")}}
        if split == "test" and rank == 0:
            self._log(f"sacrebleu: BLEU {self.signatures['bleu_signature']} | chrF {self.signatures['chrf_signature']}")
        return {"loss": loss / max(ntok, 1), "exact_match": exact / max(count, 1), **scores}

    def translate(self, state, lines: list[str], device="cpu", beam: int | None = None) -> list[str]:
        """Translations of raw source lines (tokenized here), greedy or beam search (default test_beam)."""
        c = self.cfg
        srcs = [torch.tensor(ids[:c.max_len - 1] + [EOS]) for ids in self.src_vocab.encode_batch(lines)]
        hyp = self.hypotheses(state, srcs, beam or c.test_beam, device)
        return [self.tgt_vocab.decode(hyp[i]) for i in range(len(lines))]


def model_config(cfg: TranslationConfig, src_vocab_size: int, tgt_vocab_size: int) -> TransformerConfig:
    """The Transformer of `cfg`, made once from the recipe's fields (positions for max_len tokens and bos)."""
    return TransformerConfig(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, d_model=cfg.d_model,
                             num_heads=cfg.num_heads, num_encoder_layers=cfg.num_encoder_layers,
                             num_decoder_layers=cfg.num_decoder_layers, d_ff=cfg.d_ff, dropout=cfg.dropout,
                             max_len=cfg.max_len + 1, activation=cfg.activation, pre_ln=cfg.pre_ln,
                             tie_embeddings=cfg.tie_embeddings, share_embeddings=cfg.share_embeddings)
