"""KL(policy || baseline) by Monte Carlo on responses sampled from the policy, for `cai run`'s eval.

    KL(pi || ref) = E_{x ~ prompts, y ~ pi(.|x)} [ log pi(y|x) - log ref(y|x) ]   (nats per response)

Why it is done this way:
- The expectation is over the policy's *own distribution*, so y is sampled (temperature 1, no
  top-k/top-p, no repetition penalty: a model's generation_config can carry all of those, so the
  sampler here is a plain loop rather than `generate`). Greedy answers give a biased number.
- log pi and log ref are read from the *sampled token ids*. Decoding the answer to text,
  stripping it and tokenising it again can give other ids (merges across the prompt boundary,
  whitespace, byte fallback), and then the number is the KL of some other sequence.
- It runs on the model's device: CUDA when there is one (a 7B model on the CPU takes hours).
- On a vLLM engine (`estimate_kl_on_engine`) the samples and log pi come from vLLM's sampler
  (raw log-probabilities of the sampled ids) and log ref from its prompt log-probabilities of the
  same ids under the reference: 53 s -> about 12 s for the quickstart's 32 samples on the CPU.

The reference is the SFT adapter when the recipe trains one (what DPO, GRPO, RLOO and PPO start
from), else the base with the adapter disabled. The samples, their ids and both log-probabilities
are kept in `kl_samples.json` under a key of model, adapters, prompts and settings, so a rerun
reuses them and anyone can check the number.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from cai import chat, runtime, store
from cai.errors import CaiError
from cai.eval_stats import mean_interval
from cai.prompt_sets import Prompt


@dataclass(frozen=True)
class KLSettings:
    enabled: bool = True
    samples_per_prompt: int = 1
    max_tokens: int | None = None  # default: the eval section's max_tokens
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1:
            raise CaiError("must be >= 1", field="kl.samples_per_prompt")
        if self.batch_size < 1:
            raise CaiError("must be >= 1", field="kl.batch_size")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise CaiError("must be >= 1", field="kl.max_tokens")


def stop_ids(lm, tokenizer) -> set[int]:
    """Every id that ends a reply: the tokenizer's eos and the generation config's (often a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else ({configured} if configured is not None else set())
    return ids


@torch.no_grad()
def sample(lm, prompt_ids: Sequence[list[int]], *, max_new_tokens: int, stop: set[int], pad_id: int,
           generator: torch.Generator) -> list[list[int]]:
    """Ancestral sampling from the model's own next-token distribution, a batch at a time.

    Prompts are left-padded (positions count from each prompt's first real token); a row stops
    after it samples a stop id, which is kept: the chance of ending is part of the distribution."""
    device = lm.device
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    stop_tensor = torch.tensor(sorted(stop), device=device, dtype=torch.long)
    finished = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    responses: list[list[int]] = [[] for _ in prompt_ids]
    position = positions[:, -1:]
    for _ in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for row in (~finished).nonzero().flatten().tolist():
            responses[row].append(int(token[row]))
        finished |= torch.isin(token, stop_tensor)
        if bool(finished.all()):
            break
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        position = position + 1
        out = lm(input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=out.past_key_values,
                 use_cache=True)
    return responses


@torch.no_grad()
def sequence_logprobs(lm, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int) -> list[float]:
    """sum_t log p(y_t | x, y_<t) for each (prompt, response) of token ids, under the active adapter.

    Right padding: a row's real tokens never attend to the padding after them, so the positions
    are the plain 0..n-1 of an unpadded sequence."""
    sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    logits = lm(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device)).logits
    totals = []
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        start = len(prompt)
        step = torch.log_softmax(logits[row, start - 1 : start - 1 + len(response)].float(), dim=-1)
        targets = torch.tensor(response, device=step.device)[:, None]
        totals.append(float(step.gather(-1, targets).sum()))
    return totals


def sampled_kl(lm, tokenizer, prompts: Sequence[Prompt], *, policy: str, reference: str | None, samples_per_prompt: int,
               max_tokens: int, batch_size: int, seed: int) -> list[dict]:
    """One row per sampled response: its prompt, token ids and log-probabilities under both models.

    `lm` is a PeftModel holding the adapter named `policy` (and `reference`, when given; without
    one the reference is the base with adapters disabled)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = stop_ids(lm, tokenizer)
    jobs = [(p, k) for p in prompts for k in range(samples_per_prompt)]
    encoded = {p.id: tokenizer(chat.render(tokenizer, p.messages), add_special_tokens=False)["input_ids"] for p in prompts}
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    rows = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        prompt_ids = [encoded[p.id] for p, _ in batch]
        lm.set_adapter(policy)
        responses = sample(lm, prompt_ids, max_new_tokens=max_tokens, stop=stop, pad_id=pad_id, generator=generator)
        policy_lp = sequence_logprobs(lm, prompt_ids, responses, pad_id)
        if reference is not None:
            lm.set_adapter(reference)
            reference_lp = sequence_logprobs(lm, prompt_ids, responses, pad_id)
        else:
            with lm.disable_adapter():
                reference_lp = sequence_logprobs(lm, prompt_ids, responses, pad_id)
        for (prompt, k), ids, lp, ref in zip(batch, responses, policy_lp, reference_lp):
            rows.append({"prompt_id": prompt.id, "sample": k, "token_ids": ids, "policy_logprob": lp, "reference_logprob": ref,
                         "stopped": bool(ids) and ids[-1] in stop})
    return rows


def summarise(rows: Sequence[dict], reference_name: str, max_tokens: int, device: str) -> dict:
    ratios = [r["policy_logprob"] - r["reference_logprob"] for r in rows]
    tokens = sum(len(r["token_ids"]) for r in rows)
    return {
        **mean_interval(ratios),
        "per_token": round(sum(ratios) / tokens, 6) if tokens else None,
        "mean_tokens": round(tokens / len(rows), 2) if rows else None,
        "cut_at_max_tokens": round(sum(not r["stopped"] for r in rows) / len(rows), 4) if rows else None,
        "label": f"KL(policy || {reference_name}), nats per response, {len(rows)} samples",
        "reference": reference_name,
        "estimator": "mean over responses sampled from the policy (temperature 1) of log pi(y|x) - log ref(y|x), "
                     "read from the sampled token ids; 95% CI by normal approximation",
        "max_tokens": max_tokens,
        "device": device,
    }


def _kept(cache: Path, key: str) -> dict | None:
    try:
        kept = json.loads(cache.read_text())
        return kept if kept["key"] == key else None
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def estimate_kl_on_engine(engine, prompts: Sequence[Prompt], cache: Path, *, policy: str, reference: str | None,
                          reference_name: str = "base", settings: KLSettings = KLSettings(), max_tokens: int = 128,
                          seed: int = 0, adapter_digests: Sequence[str | None] = ()) -> dict:
    """The same estimate on an engine with `sample_token_logprobs` and `sequence_logprobs` (vLLM),
    whose adapters `policy` and `reference` (None: the base) are already attached. Each sample has
    its own seed, so the rows do not depend on batching."""
    from cai.durable import request_seed

    key = store.stable_id(engine.model, engine.name, list(adapter_digests), reference_name,
                          [list(p.messages) for p in prompts], asdict(settings), max_tokens, seed)
    device = f"{engine.name} on {'cuda' if torch.cuda.is_available() else 'cpu'}"
    kept = _kept(cache, key)
    if kept is not None:
        return summarise(kept["rows"], reference_name, max_tokens, kept["device"])
    jobs = [(p, k) for p in prompts for k in range(settings.samples_per_prompt)]
    encoded = {p.id: engine.tokenizer(chat.render(engine.tokenizer, p.messages), add_special_tokens=False)["input_ids"]
               for p in prompts}
    prompt_ids = [encoded[p.id] for p, _ in jobs]
    sampled = engine.sample_token_logprobs(prompt_ids, max_tokens, [request_seed("kl", p.id, k, seed) for p, k in jobs],
                                           adapter=policy)
    reference_lp = engine.sequence_logprobs(prompt_ids, [ids for ids, _, _ in sampled], adapter=reference)
    rows = [{"prompt_id": p.id, "sample": k, "token_ids": ids, "policy_logprob": lp, "reference_logprob": ref, "stopped": stopped}
            for (p, k), (ids, lp, stopped), ref in zip(jobs, sampled, reference_lp)]
    store.write_json_atomic(cache, {"key": key, "device": device, "rows": rows})
    return summarise(rows, reference_name, max_tokens, device)


def estimate_kl(model_name: str, policy_adapter: str, prompts: Sequence[Prompt], cache: Path, *,
                reference_adapter: str | None = None, reference_name: str = "base", settings: KLSettings = KLSettings(),
                max_tokens: int = 128, seed: int = 0, threads: int = 0, trust_remote_code: bool = False,
                adapter_digests: Sequence[str | None] = ()) -> dict:
    """Load base + adapters on the runtime device, sample, score, summarise; `cache` keeps the rows."""
    from peft import PeftModel

    from cai.loading import load_causal_lm, load_tokenizer

    device = runtime.apply(runtime.RuntimeSettings(threads=threads))
    key = store.stable_id(model_name, list(adapter_digests), reference_name, [list(p.messages) for p in prompts],
                          asdict(settings), max_tokens, seed)
    kept = _kept(cache, key)
    if kept is not None:
        return summarise(kept["rows"], reference_name, max_tokens, kept["device"])
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    placement = {"device_map": {"": 0}} if device == "cuda" else {}
    base = load_causal_lm(model_name, dtype=runtime.model_dtype(device), trust_remote_code=trust_remote_code, **placement)
    lm = PeftModel.from_pretrained(base, policy_adapter, adapter_name="policy")
    if reference_adapter:
        lm.load_adapter(reference_adapter, adapter_name="reference")
    lm.eval()
    try:
        rows = sampled_kl(lm, tokenizer, prompts, policy="policy", reference="reference" if reference_adapter else None,
                          samples_per_prompt=settings.samples_per_prompt, max_tokens=max_tokens,
                          batch_size=settings.batch_size, seed=seed)
    finally:
        del lm, base
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    store.write_json_atomic(cache, {"key": key, "device": device, "rows": rows})
    return summarise(rows, reference_name, max_tokens, device)
