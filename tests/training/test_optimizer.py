"""gemmatune.training.optimizer.adamw_8bit: bitsandbytes' 8-bit AdamW without the per-tensor sync must
make exactly the updates bitsandbytes' own step makes."""
import bitsandbytes as bnb
import torch

from gemmatune.training.optimizer import adamw_8bit


def test_same_updates_as_bitsandbytes():
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 1536), (100,)]  # 8-bit states (>= 4096 elements) and 32-bit ones
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    results = []
    for make in (lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, weight_decay=0.1),
                 lambda ps: adamw_8bit(ps, lr=1e-2, weight_decay=0.1)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for theirs, ours, first in zip(*results, start):
        assert not torch.equal(ours, first)  # it did update
        assert torch.equal(ours, theirs)
