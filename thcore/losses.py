"""The output layer fused with cross-entropy, a chunk of tokens at a time (`StepOptions.ce_chunk`).

The plain path materialises logits [tokens, vocab] and their fp32 copy for the loss (GPT-2: 50304 floats per
token, more than the rest of the activations at short contexts) and keeps them for the backward. Here each chunk's
logits live only inside the forward: the chunk's loss *and* its gradients with respect to the features, the output
weight and bias are computed at once (softmax - one-hot is the gradient of the loss in the logits), and the
backward only scales them by the incoming gradient. Same FLOPs as the plain path; peak memory drops by the logits.
The loss is a sum (step.loss_fn's contract), so it is linear in the gradient that comes back: no recompute.
"""
import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, label_smoothing, ignore_index, vocab):
        n = h.size(0)
        padded = vocab < weight.size(0)
        acc = torch.promote_types(weight.dtype, torch.float32)   # gradients of the weight accumulate in >= fp32
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if bias is not None else None
        loss = torch.zeros((), dtype=acc, device=h.device)
        eps = label_smoothing
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            out = F.linear(hc, weight, bias)            # under autocast: bf16/fp16, as the plain output layer
            logits = out.to(acc)
            if padded:   # rows past the vocabulary (a padded output layer): no token, probability 0, no gradient
                logits[:, vocab:] = float("-inf")
            lse = logits.logsumexp(-1)
            valid = tc != ignore_index
            tsafe = torch.where(valid, tc, 0)[:, None]
            nll = lse - logits.gather(1, tsafe).squeeze(1)
            # F.cross_entropy's label smoothing: (1 - eps) * nll + eps * mean over the vocabulary of -log p
            per_tok = nll if eps == 0 else (1 - eps) * nll + eps * (lse - logits[:, :vocab].mean(-1))
            loss = loss + torch.where(valid, per_tok, 0).sum()
            g = (logits - lse[:, None]).exp_()          # softmax
            if eps:
                g[:, :vocab].sub_(eps / vocab)
            g.scatter_add_(1, tsafe, torch.full_like(tsafe, -(1 - eps), dtype=g.dtype))
            g.mul_(valid[:, None])
            gc = g.to(out.dtype)
            grad_h[s:s + chunk] = gc @ weight.to(out.dtype)
            grad_w += (gc.t() @ hc.to(out.dtype)).to(acc)
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype),
                              grad_b.to(bias.dtype) if grad_b is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
                grad_b * grad_loss.to(grad_b.dtype) if grad_b is not None else None, None, None, None, None, None)


def linear_cross_entropy(h, weight, bias, targets, chunk: int, label_smoothing: float = 0.0,
                         ignore_index: int = -100, vocab: int | None = None):
    """sum over tokens of cross_entropy(h @ weight.T + bias, targets) (targets == ignore_index left out), with
    h [N, D], weight [V, D], bias [V] or None, targets [N]; logits are never all held at once. `vocab` < V: the
    classes are the first `vocab` rows; the matmuls still run over all V (a padded V keeps its alignment)."""
    return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk, label_smoothing, ignore_index,
                                     weight.size(0) if vocab is None else vocab)
