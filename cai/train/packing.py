"""Padding-free forwards on a CPU: the rows of a right-padded batch packed into fewer rows.

    from cai.train import packing; packing.install(trainer.model)   # done by cai.train.tracking.train

Why cai owns this. TRL's collators pad every row of a batch to its longest row. On the
quickstart's preference data that is 31% more tokens than the rows hold (12,454 vs 9,531 for the
reward model's batches of 4 pairs), and on a CPU every padded token costs its full share of the
matrix multiplies. TRL's own `padding_free` flattens a batch into one row, which is right for
flash-attention kernels; with PyTorch's CPU attention the whole row becomes one masked square,
so attention grows with the square of the batch's token count. Here the rows are instead packed,
first fit by decreasing length, into as few rows as fit the batch's longest row: attention stays
within the square of the longest row, and the matrix multiplies see only the real tokens plus
the tail of each packed row.

How it stays exact. Each packed sequence gets position ids that restart at 0 and no 2-D
attention mask; transformers (>= 5) then builds a block-causal mask from the position ids, so a
token attends only to earlier tokens of its own sequence, as it did in its padded row. The label
of each sequence's first token is set to -100 in the packed labels (in a padded row nothing
predicts it; packed, the previous sequence's last token would). The per-token outputs of TRL's
fused LM head (`log_probs`, `label_mask`, ...) are scattered back to the padded layout, with 0
where the padded row had padding, and `loss` is unchanged because the same positions count. With
dropout off the results equal the padded forward's to float rounding (tests/test_packing.py); with
LoRA dropout on, the dropout masks are drawn for the packed shape, so a run's losses differ from
the padded ones the way two seeds do.

Only for calls TRL makes with `fused_lm_head=True`, right-padded rows, no position ids of their
own, CPU tensors and an sdpa or eager attention, and only when packing saves rows; every other
call goes to the model's forward unchanged. Not every architecture reads packed position ids
(measured with transformers 5.19: OPT derives positions from the mask, Bloom's ALiBi ignores
them, and with a KV cache none of them do: TRL's fused head always runs without one), so each
model is first checked once on a 10-token probe, packed against padded (`honours_packing`);
one that fails is never packed. The reward model's trainer asks `sequence_scores`
for its rewards: the backbone on the packed rows, the score head on each sequence's last token
(the token transformers' sequence classifiers read: the rightmost one that is not the pad id).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

PASSED_KWARGS = {"input_ids", "attention_mask", "labels", "fused_lm_head", "use_cache", "num_items_in_batch",
                 "output_router_logits"}
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
STATS = {"packed_calls": 0, "rows_in": 0, "rows_out": 0}  # this process's packed forwards (tests, bench)


def plan_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into bins of at most `capacity` tokens: first fit by decreasing length
    (ties by index, so the plan is deterministic). Within a bin, rows keep that order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[row] <= free:
                bins[b].append(row)
                room[b] -= lengths[row]
                break
        else:
            bins.append([row])
            room.append(capacity - lengths[row])
    return bins


@dataclass
class Packing:
    """Where each token of a right-padded (B, L) batch goes in the packed (P, C) batch."""

    lengths: list[int]
    bins: list[list[int]]
    capacity: int
    width: int  # L, the padded batch's width

    @classmethod
    def plan(cls, attention_mask: torch.Tensor) -> "Packing | None":
        """A packing of the batch, or None when it is not right-padded or packing saves no row."""
        if attention_mask.dim() != 2:
            return None
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
        if not torch.equal(attention_mask.bool(), positions.unsqueeze(0) < lengths.unsqueeze(1)) or int(lengths.min()) < 1:
            return None  # left padding or holes: not this layout
        lengths = [int(n) for n in lengths]
        capacity = max(lengths)
        bins = plan_bins(lengths, capacity)
        if len(bins) >= len(lengths):
            return None
        return cls(lengths, bins, capacity, attention_mask.size(1))

    @functools.cached_property
    def _flat_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source flat index into the padded batch, destination flat index into the packed batch)
        for every real token, and the packed flat index where each sequence starts."""
        source, target, starts = [], [], []
        for b, rows in enumerate(self.bins):
            offset = 0
            for row in rows:
                n = self.lengths[row]
                source.append(torch.arange(n) + row * self.width)
                target.append(torch.arange(n) + b * self.capacity + offset)
                starts.append(b * self.capacity + offset)
                offset += n
        return torch.cat(source), torch.cat(target), torch.tensor(starts)

    def pack(self, values: torch.Tensor, fill) -> torch.Tensor:
        """A (B, L) tensor as (P, C), `fill` in each packed row's unused tail."""
        source, target, _ = self._flat_index
        out = values.new_full((len(self.bins) * self.capacity,), fill)
        out[target.to(values.device)] = values.reshape(-1)[source.to(values.device)]
        return out.view(len(self.bins), self.capacity)

    def position_ids(self, device) -> torch.Tensor:
        """Positions restarting at 0 for every sequence and for each packed row's padding tail."""
        out = torch.zeros(len(self.bins), self.capacity, dtype=torch.long)
        for b, rows in enumerate(self.bins):
            offset = 0
            for row in rows:
                n = self.lengths[row]
                out[b, offset : offset + n] = torch.arange(n)
                offset += n
            out[b, offset:] = torch.arange(self.capacity - offset)
        return out.to(device)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        packed = self.pack(labels, -100).reshape(-1)
        packed[self._flat_index[2].to(packed.device)] = -100  # nothing predicts a sequence's first token
        return packed.view(len(self.bins), self.capacity)

    def unpack_shifted(self, values: torch.Tensor) -> torch.Tensor:
        """A per-token output of the shifted positions, (P, C - 1), back to (B, L - 1) with 0 (False)
        at padding; differentiable (a gather)."""
        source, target, _ = self._flat_index
        rows = len(self.lengths)
        # Packed position t (< C - 1) predicts token t + 1, so padded position s of a row maps to packed s.
        keep = (source % self.width) < (self.width - 1)
        keep &= (target % self.capacity) < (self.capacity - 1)
        src = source[keep]
        dst = target[keep]
        dst = (dst // self.capacity) * (self.capacity - 1) + dst % self.capacity
        src = (src // self.width) * (self.width - 1) + src % self.width
        flat = values.reshape(-1)
        out = flat.new_zeros(rows * (self.width - 1))
        out = out.index_copy(0, src.to(flat.device), flat.index_select(0, dst.to(flat.device)))
        return out.view(rows, self.width - 1)


def _count(plan: Packing) -> None:
    STATS["packed_calls"] += 1
    STATS["rows_in"] += len(plan.lengths)
    STATS["rows_out"] += len(plan.bins)


def _probe_error(inner) -> float:
    """Largest relative difference of the backbone's hidden states, packed vs padded, on three
    short rows (lengths 5, 3, 2: two packed rows), dropout off and no gradients."""
    backbone = getattr(inner, inner.base_model_prefix)
    vocab = inner.config.vocab_size
    pad = inner.config.pad_token_id if inner.config.pad_token_id is not None else 0
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    ids = (torch.arange(15).view(3, 5) * 7 + 3) % vocab
    ids = torch.where(mask.bool(), torch.where(ids == pad, (ids + 1) % vocab, ids), torch.full_like(ids, pad))
    plan = Packing.plan(mask)
    modes = [(module, module.training) for module in inner.modules()]
    inner.eval()
    try:
        with torch.no_grad():
            padded = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            packed = backbone(input_ids=plan.pack(ids, pad), attention_mask=None, use_cache=False,
                              position_ids=plan.position_ids(ids.device)).last_hidden_state
    finally:
        for module, training in modes:
            module.training = training
    source, target, _ = plan._flat_index
    want = padded.reshape(-1, padded.size(-1))[source].float()
    got = packed.reshape(-1, packed.size(-1))[target].float()
    return float((want - got).abs().max() / want.abs().max().clamp_min(1e-6))


def honours_packing(inner) -> bool:
    """Whether `inner` (a transformers model) gives packed rows the padded rows' hidden states:
    checked once per model object and remembered on it."""
    known = inner.__dict__.get("_cai_packing_ok")
    if known is None:
        try:
            dtype = next(inner.parameters()).dtype
            tolerance = 1e-4 if dtype == torch.float32 else 4e-3  # measured: 1e-7 when honoured, >= 8e-3 when not
            known = _probe_error(inner) <= tolerance
        except Exception:  # an architecture the probe cannot drive: do not pack it
            known = False
        inner.__dict__["_cai_packing_ok"] = known
    return known


def _wants_packing(model, kwargs: dict) -> bool:
    given = {name for name, value in kwargs.items() if value is not None}  # PEFT passes unset options as None
    if not kwargs.get("fused_lm_head") or given - PASSED_KWARGS:
        return False
    input_ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
    if input_ids is None or mask is None or labels is None or input_ids.device.type != "cpu":
        return False
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager") and honours_packing(model)


def packed_forward(forward, model, kwargs: dict):
    """`forward(**kwargs)` (TRL's fused-head forward) on the packed batch, outputs in the padded layout."""
    plan = Packing.plan(kwargs["attention_mask"])
    if plan is None:
        return forward(**kwargs)
    inner = dict(kwargs)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    inner["input_ids"] = plan.pack(kwargs["input_ids"], pad)
    inner["labels"] = plan.labels(kwargs["labels"])
    inner["attention_mask"] = None
    inner["position_ids"] = plan.position_ids(kwargs["input_ids"].device)
    outputs = forward(**inner)
    _count(plan)
    for name in PER_TOKEN_FIELDS:
        value = getattr(outputs, name, None)
        if isinstance(value, torch.Tensor) and value.shape == (len(plan.bins), plan.capacity - 1):
            setattr(outputs, name, plan.unpack_shifted(value))
    return outputs


def install(model) -> bool:
    """Pack the fused-head calls of `model`'s causal LM (the PEFT base model's, when wrapped).
    Idempotent; False when the model has no TRL fused head to wrap."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = inner.__dict__.get("forward")  # TRL's fused head is an instance attribute
    if forward is None or getattr(forward, "_cai_packing", False) or "fused_lm_head" not in forward.__code__.co_varnames:
        return False

    def _packing_forward(self, *args, **kwargs):
        if args or not _wants_packing(self, kwargs):
            return forward(*args, **kwargs)
        return packed_forward(forward, self, kwargs)

    inner.forward = types.MethodType(_packing_forward, inner)
    inner.forward.__func__._cai_packing = True
    return True


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's (B, num_labels) logits, as `model(input_ids, attention_mask).logits`
    gives them, from packed rows when `Packing` applies (CPU, sdpa/eager, right padding, rows saved)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    plan = None
    if input_ids.device.type == "cpu" and getattr(config, "_attn_implementation", None) in ("sdpa", "eager") \
            and config.pad_token_id is not None and hasattr(inner, "score") and honours_packing(inner):
        plan = Packing.plan(attention_mask)
    if plan is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=plan.pack(input_ids, config.pad_token_id), position_ids=plan.position_ids(input_ids.device),
                      attention_mask=None, use_cache=False).last_hidden_state
    # transformers reads the rightmost token that is not the pad id (0 when there is none).
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    last = (positions * (input_ids != config.pad_token_id)).argmax(dim=1)
    source, target, _ = plan._flat_index
    where = torch.empty(len(plan.lengths) * plan.width, dtype=torch.long)
    where[source] = target
    rows = torch.arange(len(plan.lengths)) * plan.width + last.cpu()
    _count(plan)
    return inner.score(hidden.reshape(-1, hidden.size(-1))[where[rows].to(hidden.device)])
