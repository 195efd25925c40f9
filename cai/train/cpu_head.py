"""Per-token log-probs of the LM head on a CPU: only the positions that count, in plain matmuls.

    from cai.train import cpu_head; cpu_head.install()   # done by every cai trainer module at import

Why cai owns this. TRL 1.16's trainers (SFT, DPO, KTO, GRPO, RLOO) call the model with
`fused_lm_head=True`, which computes log-probs tile by tile through `ChunkedLogProbFunction`
without materialising the logits. On CUDA that is a Triton kernel over the labelled positions
only. On a CPU it falls back to (1) scoring *every* position, prompt and padding included
(`compact` is tied to Triton, to spare Neuron recompilations), and (2) a torch fold of the
Triton kernel that makes about ten passes over each [tokens x vocab] tile. Measured on the
builtin model (49,152-token vocabulary, 2 cores): forward + backward of the head for 565
positions took 1.27 s, a quarter of an SFT step, against 0.49 s for plain logits and
cross-entropy; and SFT's loss reads only the ~half of the positions that are the answer.

`install()` keeps TRL's forward and changes the two things on CPU tensors: the labelled
positions only (the compact path TRL uses with Triton), and `CpuLogProbs` below for the tile
work, which computes the same quantities (log-prob of the target, and when asked the entropy,
log-sum of squared probabilities, mean logit and top-1 flag) with one matmul and one
log-sum-exp per token chunk, and in backward recomputes the chunk's logits (as TRL does, so
memory stays bounded by one chunk) and forms the gradient in place. Logit soft-capping and
other devices go to TRL's function unchanged. tests/test_cpu_head.py checks values and
gradients against TRL's function and that a trainer's model goes through this one.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

TOKEN_CHUNK = 1024  # rows per logits tile: 1,024 x 49,152 fp32 is 200 MB
KEEP_BYTES = 1 << 30  # up to this size the forward keeps the probabilities for backward instead of recomputing
OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_installed: dict = {}


class CpuLogProbs(torch.autograd.Function):
    """Same signature and outputs as TRL's `ChunkedLogProbFunction` (without soft-capping)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=OUTPUTS):
        ctx.set_materialize_grads(False)
        scale = logit_scale / temperature
        n = hidden.shape[0]
        wanted = {name: name in outputs for name in OUTPUTS}
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        log_z = hidden.new_empty(n, dtype=torch.float32)
        extra = {name: hidden.new_empty(n, dtype=torch.bool if name == "is_top1" else torch.float32)
                 for name, on in wanted.items() if on}
        # Keeping p saves backward a matmul per chunk (a third of the head's time) for n x vocab floats.
        keep = any(ctx.needs_input_grad[:3]) and n * weight.shape[0] * 4 <= KEEP_BYTES
        kept = hidden.new_empty((n, weight.shape[0]), dtype=torch.float32) if keep else None
        for start in range(0, n, TOKEN_CHUNK):
            rows = slice(start, min(start + TOKEN_CHUNK, n))
            z = _logits(hidden[rows], weight, bias, scale)
            lse = torch.logsumexp(z, dim=-1)
            log_z[rows] = lse
            logprobs[rows] = z.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - lse
            if wanted["is_top1"]:  # argmax takes the first maximum, as TRL's tie rule does
                extra["is_top1"][rows] = z.argmax(dim=-1) == targets[rows]
            if wanted["mean_logits"]:
                extra["mean_logits"][rows] = z.mean(dim=-1)
            if wanted["log_sum_sq_probs"]:
                extra["log_sum_sq_probs"][rows] = torch.logsumexp(2 * z, dim=-1) - 2 * lse
            if wanted["entropy"] or keep:
                p = torch.sub(z, lse.unsqueeze(-1), out=kept[rows] if keep else None).exp_()
                if wanted["entropy"]:  # H = lse - sum(p z)
                    extra["entropy"][rows] = lse - (p * z).sum(dim=-1)
        entropy = extra.get("entropy")
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.kept = kept
        ctx.scale = scale
        ctx.mark_non_differentiable(*(extra[k] for k in ("log_sum_sq_probs", "mean_logits", "is_top1") if k in extra))
        return logprobs, entropy, extra.get("log_sum_sq_probs"), extra.get("mean_logits"), extra.get("is_top1")

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if need_bias else None
        n = hidden.shape[0]
        for start in range(0, n, TOKEN_CHUNK):
            rows = slice(start, min(start + TOKEN_CHUNK, n))
            if ctx.kept is not None:
                p = ctx.kept[rows]
            else:
                p = _logits(hidden[rows], weight, bias, ctx.scale).sub_(log_z[rows].unsqueeze(-1)).exp_()
            if grad_logprobs is not None:  # d log p_t / dz_j = 1[j = t] - p_j
                g = grad_logprobs[rows].float().unsqueeze(-1)
                grad = p * -g
                grad.scatter_add_(-1, targets[rows].unsqueeze(-1), g)
            else:
                grad = torch.zeros_like(p)
            if grad_entropy is not None:  # dH/dz_j = -p_j (log p_j + H)
                grad -= grad_entropy[rows].float().unsqueeze(-1) * p * (p.log() + entropy[rows].unsqueeze(-1))
            if ctx.scale != 1.0:
                grad.mul_(ctx.scale)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ weight.float()
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), hidden[rows].float())
            if grad_bias is not None:
                grad_bias += grad.sum(dim=0)
        ctx.kept = None
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(grad_hidden, hidden), cast(grad_weight, weight), cast(grad_bias, bias), None, None, None, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias, scale: float) -> torch.Tensor:
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z += bias.float()
    if scale != 1.0:
        z *= scale
    return z


def install() -> bool:
    """Route TRL's fused LM head through `CpuLogProbs` on CPU tensors (labelled positions only).
    Idempotent; returns False, leaving TRL untouched, when this TRL lacks the names it replaces."""
    if _installed:
        return True
    try:
        from trl.trainer import utils
        original_function, original_use_triton = utils._ChunkedLogProbFunction, utils._use_triton
    except (ImportError, AttributeError) as exc:
        log.warning("TRL's fused LM head was not found (%s): its CPU fallback stays in use", exc)
        return False

    class Dispatch:
        """TRL's function everywhere except CPU tensors without soft-capping."""

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=OUTPUTS):
            chosen = CpuLogProbs if hidden.device.type == "cpu" and softcap is None else original_function
            return chosen.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)

    # In trl.trainer.utils, `_use_triton` only decides whether the head sees the labelled positions
    # alone ("compact"); the kernel module keeps its own reference, so its choice of kernel is unchanged.
    utils._use_triton = lambda device: device.type == "cpu" or original_use_triton(device)
    utils._ChunkedLogProbFunction = Dispatch
    _installed.update(function=original_function, use_triton=original_use_triton)
    return True


def uninstall() -> None:
    """Put TRL's own head back (tests compare the two)."""
    if _installed:
        from trl.trainer import utils

        utils._ChunkedLogProbFunction, utils._use_triton = _installed["function"], _installed["use_triton"]
        _installed.clear()
