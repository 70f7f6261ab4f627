"""Common config fields reach what they configure in every task, and errors name the field the user gave."""
import pytest
import torch.nn.functional as F

from helpers import shakespeare_chars
from thcore import func
from thcore.config import ConfigError, from_dict
from thcore.step import train_step
from thcore.tasks.lm import LMConfig, LMTask

TINY_LM = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.0, batch_size=4, eval_iters=2)


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    return shakespeare_chars(tmp_path_factory, 20_000)


def _lm(tmp_path, **kw):
    return from_dict(LMConfig, {"name": "fields", "out_dir": str(tmp_path / "run"), **TINY_LM, **kw})


def test_label_smoothing_changes_the_gpt_loss_as_cross_entropy_says(tmp_path, chars):
    losses = {}
    for eps in (0.0, 0.2):
        task = LMTask(_lm(tmp_path, data_dir=chars, label_smoothing=eps))
        state = task.init_state(10)
        assert state.options.label_smoothing == eps
        batch = next(iter(task.train_loader(0, 0, type("E", (), {"world_size": 1, "rank": 0})())))
        logits = func.apply(state.model, state.params, state.buffers, idx=batch["idx"])
        expect = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), label_smoothing=eps)
        _, m = train_step(state, batch)
        losses[eps] = float(m["loss_sum"] / m["ntokens"])
        assert losses[eps] == pytest.approx(float(expect), rel=1e-5)
    # near-uniform logits at init: smoothing moves the loss little, but far more than the 1e-5 matched above
    assert abs(losses[0.2] - losses[0.0]) > 1e-4 * losses[0.0]


def test_a_missing_datasets_dir_names_the_datasets_field(tmp_path, chars):
    with pytest.raises(ConfigError, match=r"^datasets: .*missing.*meta\.json: not found"):
        LMTask(_lm(tmp_path, datasets={chars: 1, str(tmp_path / "missing"): 2}))
    with pytest.raises(ConfigError, match=r"^data_dir: .*meta\.json: not found"):
        LMTask(_lm(tmp_path, data_dir=str(tmp_path / "missing")))


def test_translation_without_a_test_split_says_so(tmp_path):
    from thcore.data import demo
    from thcore.tasks.translation import TranslationConfig, TranslationTask
    d = tmp_path / "corpus"
    d.mkdir()
    for split, (src, tgt) in demo.splits(200, 20, 20, seed=0).items():
        if split != "test":
            (d / f"{split}.en").write_text("".join(s + "\n" for s in src))
            (d / f"{split}.de").write_text("".join(t + "\n" for t in tgt))
    cfg = from_dict(TranslationConfig, {"name": "t", "out_dir": str(tmp_path / "run"), "data_dir": str(d),
                                        "d_model": 32, "num_heads": 2, "d_ff": 64})
    task = TranslationTask(cfg)
    assert task.warnings == [f"warning: no test split (test_src / test_tgt in {d}): the run reports no test scores"]
    assert task.summary.splitlines()[-1] == task.warnings[0]


@pytest.mark.parametrize("values,line", [
    ({"engine": "eager", "bucket_cap_mb": 50.0}, "bucket_cap_mb=50.0: only used with engine='ddp', not engine='eager'"),
    ({"engine": "fsdp", "ddp_comm_hook": "powersgd"}, "ddp_comm_hook='powersgd': only used with engine='ddp'"),
    ({"engine": "ddp", "nvme_path": "/x"}, "nvme_path='/x': only used with engine='deepspeed'"),
    ({"engine": "deepspeed", "powersgd_rank": 2}, "powersgd_rank=2: only used with engine='ddp'"),
])
def test_a_field_the_engine_would_ignore_is_refused(tmp_path, chars, values, line):
    with pytest.raises(ConfigError, match="^" + line.replace("(", r"\(").replace(")", r"\)")):
        _lm(tmp_path, data_dir=chars, **values)


def test_num_workers_is_refused_by_the_gpt_task(tmp_path, chars):
    with pytest.raises(ConfigError, match=r"^num_workers=2: the GPT task draws its windows"):
        _lm(tmp_path, data_dir=chars, num_workers=2)
