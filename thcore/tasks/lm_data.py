"""The LM task's data pipeline: prepared token memmaps (`th.py prepare`: one directory, or a weighted mix of
several), the training windows and the fixed evaluation batches, and the tokenizer files a run keeps."""
from ..config import ConfigError
from ..data import lm as data

TRAIN_ESTIMATE = 2   # stream tag of the train-loss estimate's batches (training draws with data.TRAIN)


def read_meta(cfg) -> dict:
    """meta.json of the first source; every source of a mix must share its tokenizer."""
    dirs = list(cfg.datasets or {cfg.data_dir: 1.0})
    metas = [data.read_meta(d, "datasets" if cfg.datasets else "data_dir") for d in dirs]
    for d, m in zip(dirs[1:], metas[1:]):
        if m["tokenizer"] != metas[0]["tokenizer"]:
            raise ConfigError(f"datasets: {d} has another tokenizer than {dirs[0]}; mixed data must share one")
    return metas[0]


class LMData:
    """The train and val token mixes of `cfg`'s sources, in windows of `block_size` + 1 tokens."""

    def __init__(self, cfg, meta: dict, block_size: int):
        self.cfg, self.meta, self.block_size = cfg, meta, block_size
        sources = cfg.datasets or {cfg.data_dir: 1.0}
        self.dirs = list(sources)
        self.train, self.val = (data.TokenMix([data.open_split(d, split) for d in self.dirs],
                                              list(sources.values()), block_size) for split in ("train", "val"))
        for d in self.dirs:
            for split in ("train", "val"):
                n = len(data.open_split(d, split))
                if n <= block_size:
                    raise ConfigError(f"block_size={block_size}: {d}/{split}.bin has only {n} tokens; "
                                      "lower block_size")
        mix = ", ".join(f"{d} x{w / sum(sources.values()):.2f}" for d, w in sources.items())
        self.summary = f"data: {mix} | train {len(self.train):,} tokens, val {len(self.val):,}"

    def save_assets(self, run_dir: str):
        data.copy_tokenizer(self.dirs[0], run_dir, self.meta)

    def batches_per_epoch(self, world: int) -> int:
        """As many micro-batches as it takes to draw every training token once in expectation."""
        per_batch = self.cfg.batch_size * self.block_size * world
        return max(self.cfg.grad_accum, len(self.train) // per_batch)

    def train_batch(self, epoch: int, index: int, rank: int) -> dict:
        """Micro-batch `index` of `epoch` on `rank`: random windows, a function of the seed alone."""
        c = self.cfg
        return self.train.batch(c.batch_size, data.seed_of(c.seed, data.TRAIN, epoch, index, rank))

    def eval_batches(self, i: int) -> tuple[dict, dict]:
        """The i-th (val, train) batches of a loss estimate: the same ones at every evaluation."""
        c = self.cfg
        return tuple(mix.batch(c.batch_size, data.seed_of(c.seed, tag, i))
                     for mix, tag in ((self.val, data.VAL), (self.train, TRAIN_ESTIMATE)))
