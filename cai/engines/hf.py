"""The transformers engine: `generate` with left padding and length-sorted batches.

Always available (no vLLM needed), and the reference the other engines are tested against.
Sorting prompts by length before batching keeps padding, and so wasted compute, small; results
are put back in the caller's order. Greedy batched output equals one-at-a-time output because
left padding plus the attention mask leave each row's computation unchanged.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cai import chat, runtime
from cai.engines.base import (
    ChatPrompt,
    ChoiceScores,
    Generation,
    SamplingSettings,
    choice_token_ids,
    normalise,
    truncate_at_stop,
)
from cai.errors import CaiError
from cai.loading import load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


class PerRowSampler(LogitsProcessor):
    """Samples every row with its own seeded generator, then leaves only that token standing.

    transformers' sampling draws all rows from one global generator, so a row's sample depends
    on which other rows share its batch. Here each row has its own generator: the result is the
    same however prompts are batched, which is what makes a resumed run reproduce an
    uninterrupted one. Greedy decoding then picks the single surviving token.
    """

    def __init__(self, row_seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(seed % (2**63)) for seed in row_seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        chosen = torch.full_like(scores, -math.inf)
        for row, generator in enumerate(self.generators):
            token = torch.multinomial(probs[row], 1, generator=generator)
            chosen[row, token] = 0.0
        return chosen


class HFEngine:
    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        batch_size: int = 16,
        device: str = "auto",
        threads: int = 0,
        trust_remote_code: bool = False,
        adapters: dict[str, str] | None = None,
    ):
        self.model = model
        self.batch_size = batch_size
        self.device = runtime.apply(runtime.RuntimeSettings(device=device, threads=threads))
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code, padding_side="left")
        self.lm = load_causal_lm(
            model, dtype=runtime.model_dtype(self.device), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.lm.eval()
        self._adapters: set[str] = set()
        for adapter_name, path in (adapters or {}).items():
            self.add_adapter(adapter_name, path)

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, path: str) -> None:
        """Attach a LoRA adapter without merging; select it per call with `adapter=`."""
        if adapter_name in self._adapters:  # a retrained adapter under the same name replaces the old one
            self.lm.delete_adapter(adapter_name)
            self._adapters.discard(adapter_name)
        try:
            self.lm.load_adapter(path, adapter_name=adapter_name)
        except (OSError, ValueError) as exc:
            raise CaiError(f"cannot load LoRA adapter: {exc}", source=path) from None
        self._adapters.add(adapter_name)

    def _select(self, adapter: str | None) -> None:
        if not self._adapters:
            if adapter:
                raise CaiError(f"unknown adapter '{adapter}': none loaded")
            return
        if adapter is None:
            self.lm.disable_adapters()
        elif adapter in self._adapters:
            self.lm.set_adapter(adapter)
            self.lm.enable_adapters()
        else:
            raise CaiError(f"unknown adapter '{adapter}' (loaded: {', '.join(sorted(self._adapters))})")

    # -- generation -------------------------------------------------------------------------
    def render(self, prompt: ChatPrompt) -> str:
        return chat.render(self.tokenizer, prompt.messages, prompt.assistant_prefix)

    def generate(
        self,
        prompts: Sequence[ChatPrompt],
        sampling: SamplingSettings,
        adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Generation]:
        self._select(adapter)
        texts = [self.render(p) for p in prompts]
        results: list[Generation | None] = [None] * len(texts)
        for batch_number, indices in enumerate(self._length_sorted_batches(texts)):
            batch_seeds = [seeds[i] for i in indices] if seeds is not None else None
            if batch_seeds is None and sampling.seed is not None:
                torch.manual_seed(sampling.seed + batch_number)
            batch = self._generate_batch([texts[i] for i in indices], sampling, batch_seeds)
            for index, generation in zip(indices, batch):
                results[index] = generation
        return results  # type: ignore[return-value]

    def _length_sorted_batches(self, texts: list[str]) -> list[list[int]]:
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def _generate_batch(
        self, texts: list[str], sampling: SamplingSettings, seeds: list[int] | None = None
    ) -> list[Generation]:
        per_row = seeds is not None and not sampling.greedy
        # Greedy decoding cannot return several sequences per input, so with per-row sampling
        # each input is repeated n times instead (rows stay in prompt-major order either way).
        inputs = [t for t in texts for _ in range(sampling.n)] if per_row else texts
        encoded = self.tokenizer(inputs, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs = dict(
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=1 if per_row else sampling.n,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self._eos_ids(),
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        elif per_row:
            row_seeds = [seed * 1_000_003 + sample for seed in seeds for sample in range(sampling.n)]
            sampler = PerRowSampler(row_seeds, sampling.temperature, sampling.top_p)
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                          logits_processor=LogitsProcessorList([sampler]))
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        output = self.lm.generate(**encoded, **kwargs)
        width = encoded["input_ids"].shape[1]
        prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()
        if per_row:
            prompt_lengths = prompt_lengths[:: sampling.n]
        eos = set(self._eos_ids())
        generations = []
        for row in range(len(texts)):
            texts_out, counts, reasons = [], [], []
            for sample in range(sampling.n):
                new = output[row * sampling.n + sample, width:].tolist()
                length, finished = len(new), False
                for position, token in enumerate(new):
                    if token in eos:
                        length, finished = position, True
                        break
                text = self.tokenizer.decode(new[:length], skip_special_tokens=True)
                text, stopped = truncate_at_stop(text, sampling.stop)
                texts_out.append(text)
                counts.append(length)
                reasons.append("stop" if finished or stopped else "length")
            generations.append(Generation(texts_out, int(prompt_lengths[row]), counts, reasons))
        return generations

    def _eos_ids(self) -> list[int]:
        ids = self.lm.generation_config.eos_token_id
        ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    # -- choice scoring ---------------------------------------------------------------------
    @torch.no_grad()
    def score_choices(
        self, prompts: Sequence[ChatPrompt], choices: Sequence[str], adapter: str | None = None
    ) -> ChoiceScores:
        self._select(adapter)
        texts = [self.render(p) for p in prompts]
        probs: list[list[float] | None] = [None] * len(texts)
        mass: list[float] = [0.0] * len(texts)
        lengths: list[int] = [0] * len(texts)  # prompt tokens (no prefix cache here: none are cached)
        token_ids = choice_token_ids(self.tokenizer, texts[0], choices) if texts else []
        for indices in self._length_sorted_batches(texts):
            encoded = self.tokenizer(
                [texts[i] for i in indices], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            logits = self.lm(**encoded).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)[:, token_ids].tolist()
            for index, row, length in zip(indices, logprobs, encoded["attention_mask"].sum(dim=1).tolist()):
                probs[index], mass[index] = normalise([lp if math.isfinite(lp) else -math.inf for lp in row])
                lengths[index] = int(length)
        return ChoiceScores(probs=probs, mass=mass, prompt_tokens=lengths, cached_tokens=[0] * len(texts))  # type: ignore[arg-type]

    def close(self) -> None:
        del self.lm
