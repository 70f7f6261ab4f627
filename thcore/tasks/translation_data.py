"""The translation task's data pipeline: a run's splits read (raw files, the built-in demo task, or a prepared
directory, which a training run prepares once into its run directory) and its tokenizers trained or read back."""
import os

import attrs

from ..config import ConfigError
from ..data import demo
from ..data.subword import Subword, Words
from ..data.translation import SPLITS, DataError, TokenPairs, read_parallel, read_refs, tokenizer_files, up_to_date
from ..data.translation import prepare as prepare_pairs
from ..data.translation import read_meta as read_prepared
from ..data.translation import settings as prepare_settings
from ..data.vocab import Vocab


@attrs.frozen
class TranslationData:
    prepared: str | None   # the prepared directory read; None: encoded in memory
    splits: dict           # {split: (source lines, reference lines)} (a prepared corpus: the references only)
    data: dict             # {split: TokenPairs}, memory-mapped from a prepared directory when there is one
    skipped: int           # empty pairs skipped
    src_vocab: object
    tgt_vocab: object      # the same object as src_vocab with a joint vocabulary


def read(cfg, names, training: bool, log) -> TranslationData:
    """The splits `names` of `cfg`'s corpus and its tokenizers. A training run reads a prepared directory:
    `prepared`, or the one it prepares from raw files into its run directory (once; resumes reuse it). The demo
    task, and one split of a finished run given raw files, are encoded in memory."""
    directory = cfg.prepared or (_prepare(cfg, log) if training and cfg.train_src else "")
    if directory:
        meta = read_prepared(directory)
        if cfg.prepared:
            _check_settings(cfg, meta, directory)
        if training:
            src_vocab, tgt_vocab = _load_tokenizers(directory, cfg.tokenizer, meta["joint_vocab"])
        else:
            src_vocab, tgt_vocab = _tokenizers(cfg, None, trained=False)
        names = [n for n in names if n in meta["splits"]]
        data = {n: TokenPairs.open(directory, n, cfg.max_len, truncate=n != "train", dtype=meta["dtype"])
                for n in names}
        splits = {n: ((), read_refs(directory, n)) for n in names if n != "train"}
        return TranslationData(directory, splits, data, sum(meta["splits"][n]["skipped"] for n in names),
                               src_vocab, tgt_vocab)
    if not cfg.train_src:
        out = demo.splits(cfg.demo_train_size, cfg.demo_valid_size, cfg.demo_test_size, seed=0)
        lines, skipped = {k: v for k, v in out.items() if k in names}, 0
    else:
        lines, skipped = {}, 0
        for name in names:
            if getattr(cfg, f"{name}_src"):
                s, t, n = read_parallel(getattr(cfg, f"{name}_src"), getattr(cfg, f"{name}_tgt"),
                                        f"{name}_src", f"{name}_tgt")
                lines[name], skipped = (s, t), skipped + n
    src_vocab, tgt_vocab = _tokenizers(cfg, lines.get("train"), trained=training)
    data = {n: TokenPairs.from_lines(s, t, src_vocab, tgt_vocab, cfg.max_len, truncate=n != "train")
            for n, (s, t) in lines.items()}
    return TranslationData(None, lines, data, skipped, src_vocab, tgt_vocab)


def _prepare(cfg, log) -> str:
    """RUN_DIR/prepared from the raw files; kept when its sources and tokenizer settings are unchanged. A
    resumed run whose data changed keeps its tokenizers (the ids of its checkpoints). Under torchrun rank 0
    builds its task first (thcore/launch.py): the other ranks find the directory ready."""
    directory = os.path.join(cfg.run_dir, "prepared")
    files = {n: (getattr(cfg, f"{n}_src"), getattr(cfg, f"{n}_tgt")) for n in SPLITS if getattr(cfg, f"{n}_src")}
    want = prepare_settings(cfg.tokenizer, cfg.vocab_size, cfg.joint_vocab, cfg.min_freq, cfg.tokenizer_sample)
    if not up_to_date(directory, files, want):
        mine = [os.path.join(cfg.run_dir, n) for n in tokenizer_files(cfg.joint_vocab)]
        keep = (tuple(load_tokenizer(p, cfg.tokenizer) for p in mine)
                if cfg.resume != "never" and all(os.path.isfile(p) for p in mine) else None)
        prepare_pairs(directory, files, cfg.tokenizer, cfg.vocab_size, cfg.joint_vocab, cfg.min_freq,
                      cfg.tokenizer_sample, tokenizers=keep, log=log)
    return directory


def _tokenizers(cfg, train, trained=True):
    """(source, target) tokenizers: the run's own files when resuming or evaluating (ids must match its
    checkpoints), else trained on the training split. A joint vocabulary is one object for both sides."""
    names = ("vocab.joint", "vocab.joint") if cfg.joint_vocab else ("vocab.src", "vocab.tgt")
    paths = [os.path.join(cfg.run_dir, f"{n}.json") for n in names]
    if not trained or cfg.resume != "never" and all(os.path.isfile(p) for p in paths):
        return tuple(load_tokenizer(p, cfg.tokenizer) for p in paths)
    src, tgt = train
    if cfg.tokenizer == "word":
        build = lambda lines: Words(Vocab.build((line.split() for line in lines), cfg.min_freq))  # noqa: E731
    else:
        build = lambda lines: Subword.train(lines, cfg.tokenizer, cfg.vocab_size)  # noqa: E731
    if cfg.joint_vocab:
        joint = build(list(src) + list(tgt))
        return joint, joint
    return build(src), build(tgt)


def _check_settings(cfg, meta: dict, directory: str):
    """A prepared corpus is read with the tokenizer it was made with: the config must agree with it."""
    fields = ["tokenizer", "joint_vocab", "min_freq" if cfg.tokenizer == "word" else "vocab_size"]
    for name in fields:
        if meta[name] != getattr(cfg, name):
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: the prepared corpus {directory} was made with "
                              f"{name}={meta[name]!r} (set that, or prepare it again)")


def _load_tokenizers(directory: str, kind: str, joint: bool):
    src, tgt = (os.path.join(directory, n) for n in tokenizer_files(joint))
    if joint:
        tok = load_tokenizer(src, kind)
        return tok, tok
    return load_tokenizer(src, kind), load_tokenizer(tgt, kind)


def load_tokenizer(path: str, kind: str):
    """A saved vocabulary: a `tokenizers` JSON (bpe / unigram) or a word vocabulary."""
    if not os.path.isfile(path):
        raise DataError(f"tokenizer: {path}: missing (the run directory keeps its vocabularies)")
    return Words(Vocab.load(path)) if kind == "word" else Subword.load(path)
