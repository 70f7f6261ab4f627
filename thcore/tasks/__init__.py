"""A task is one kind of experiment as the fit loop sees it. It defines

    init_state(total_steps, device="cpu") -> TrainState     the model, optimizer and schedule, freshly initialised
    batches_per_epoch(world_size) -> int                    micro-batches per rank in one epoch
    train_loader(epoch, start, engine) -> iterable          this rank's batches of `epoch` from micro-batch `start`
                                                            (engine.rank, engine.world_size, engine.device)

and has the defaults below for the rest. Evaluation gets the sum over ranks as a function, never an engine: each
rank scores its share of a split and `reduce_sum` adds the statistics up."""


def same(t):
    """reduce_sum of a single process."""
    return t


class Task:
    summary = ""   # printed at the start of a run

    def evaluate(self, state, split: str = "valid", *, reduce_sum=same, rank: int = 0, world_size: int = 1,
                 device=None) -> dict:
        """{metric: value} on `split` ({} when the task has no such split): `loss` is the one the best checkpoint
        and early stopping follow (lower is better)."""
        return {}

    def save_assets(self, run_dir: str) -> None:
        """Files a finished run needs besides its checkpoints (vocabularies, tokenizer, model shape)."""

    def per_rank_batch(self) -> tuple[int, str]:
        """(size, unit) of one rank's micro-batch, for the global-batch line at the start of a run."""
        return self.cfg.batch_size, ""


def eval_device(state, device):
    """Where evaluation batches go: `device`, or where the params are."""
    return device if device is not None else next(iter(state.params.values())).device
