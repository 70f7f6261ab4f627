"""The functional optimizers bit for bit against torch's (AdamW with and without weight decay, SGD with momentum)
and the learning-rate schedules' values."""
import math

import pytest
import torch

from thcore.optim import SGD, AdamW, schedule


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g), "e": torch.randn(7, 3, generator=g)}


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_bitwise_equals_torch_adamw(wd):
    ours = _params()
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in ours.items()}
    tx = AdamW(beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=wd)
    opt_state = tx.init(ours)
    torch_opt = torch.optim.AdamW([{"params": [ref["w"], ref["e"]], "weight_decay": wd},
                                   {"params": [ref["b"]], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.98), eps=1e-9, foreach=True)
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in ours.items()}
        lr = 1e-2 * (i + 1) / 5
        tx.update(ours, grads, opt_state, lr)
        for group in torch_opt.param_groups:
            group["lr"] = lr
        for k, p in ref.items():
            p.grad = grads[k].clone()
        torch_opt.step()
    for k in ours:
        assert torch.equal(ours[k], ref[k].detach()), k


def test_sgd_momentum_bitwise_equals_torch_sgd():
    ours = _params()
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in ours.items()}
    tx = SGD(momentum=0.9)
    opt_state = tx.init(ours)
    torch_opt = torch.optim.SGD(list(ref.values()), lr=0.1, momentum=0.9, foreach=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in ours.items()}
        tx.update(ours, grads, opt_state, 0.1)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        torch_opt.step()
    for k in ours:
        assert torch.equal(ours[k], ref[k].detach()), k


def test_schedules():
    cos = schedule("cosine", 1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)
    lin = schedule("linear", 1.0, warmup_steps=0, total_steps=100, min_lr_ratio=0.0)
    assert lin(50) == pytest.approx(0.5) and lin(100) == pytest.approx(0.0)
    inv = schedule("inverse_sqrt", 2.0, warmup_steps=100)
    assert inv(99) == pytest.approx(2.0) and inv(399) == pytest.approx(2.0 * math.sqrt(100 / 400))
    assert schedule("constant", 0.3)(1000) == 0.3
