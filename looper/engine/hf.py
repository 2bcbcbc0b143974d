"""The `hf` backend: plain transformers `model.generate`, the reference and the fallback.

Serves any model transformers serves (an architecture the paged engine's start-up checks refuse, a quantized model),
slowly: greedy requests decode in left-padded batches of `batch_size` (sorted by length, so padding stays small);
sampled requests decode one at a time, each under its own seed (`torch.random.fork_rng`), since transformers draws a
batch's samples from one generator and a row's sample would otherwise depend on its batch. So a sampled row is
reproducible and independent of the other requests, but it is not the `paged` backend's sample for the same seed (the
two draw differently); greedy outputs equal the paged engine's in float32 (tests/test_generation.py).

Must never read the config or know rollouts from evaluations: it completes requests.
"""

import time
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from looper import prompts
from looper.engine.interface import Generation, GenerationStats, Generator, Request, eos_ids
from looper.engine.sampling import chosen_logprob as sampling_logprob


class HFGenerator(Generator):
    """transformers' `generate` (see the module docstring)."""

    name = "hf"

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[Request],
        on_result: Optional[Callable[[int, Generation], None]] = None,
        desc: Optional[str] = None,
        logprobs: bool = False,
    ) -> tuple[list[Generation], GenerationStats]:
        self.check(requests)
        tokenizer, stops = self.tokenizer, eos_ids(self.model, self.tokenizer)
        encoded = [prompts.encode_prompt(tokenizer, r.prompt) for r in requests]
        greedy = sorted((i for i, r in enumerate(requests) if r.temperature <= 0), key=lambda i: len(encoded[i]))
        batches = [greedy[k : k + self.batch_size] for k in range(0, len(greedy), self.batch_size)]
        batches += [[i] for i, r in enumerate(requests) if r.temperature > 0]
        results: list[Optional[Generation]] = [None] * len(requests)
        stats = GenerationStats(backend=self.name, sequences=len(requests), slots=min(self.batch_size, len(requests)))
        bar = tqdm(total=len(requests), desc=desc, unit="seq", leave=False, disable=desc is None)
        start = time.time()
        for rows in batches:
            decoded = self._decode([encoded[i] for i in rows], [requests[i] for i in rows], stops, logprobs)
            for i, (tokens, chosen) in zip(rows, decoded):
                limit = requests[i].max_new_tokens
                tokens = tokens[:limit]  # (a batch decodes to its longest limit; greedy prefixes are the same)
                end = next((k for k, t in enumerate(tokens) if t in stops), None)
                body = tokens if end is None else tokens[:end]
                results[i] = Generation(
                    tokenizer.decode(body, skip_special_tokens=True),
                    len(tokens) if end is None else end + 1,
                    "length" if end is None else "stop",
                )
                if logprobs:
                    kept = results[i].num_tokens
                    results[i].prompt_ids, results[i].token_ids = encoded[i], tokens[:kept]
                    results[i].logprobs = chosen[:kept]
                stats.real_tokens += results[i].num_tokens
                bar.update(1)
                if on_result is not None:
                    on_result(i, results[i])
        bar.close()
        stats.seconds = time.time() - start
        return results, stats

    def _decode(self, prompts: list[list[int]], requests: list[Request], stops: list[int], logprobs: bool) -> list:
        """(generated ids, their log-probs or None) of `prompts` decoded together (left-padded), to the longest of
        their limits (the logits are kept only with `logprobs`: a whole batch's are large)."""
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        first = requests[0]
        sampling = (
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            if first.temperature <= 0
            else {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p, "top_k": 0}
        )
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(first.seed)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(r.max_new_tokens for r in requests),
                eos_token_id=stops,
                pad_token_id=pad,
                return_dict_in_generate=True,
                output_logits=logprobs,
                **sampling,
            )
        generated = out.sequences[:, width:]
        if not logprobs:
            return [(tokens, None) for tokens in generated.tolist()]
        logits = torch.stack(out.logits, dim=1)  # [rows, steps, vocab], before any sampling processor
        temperature = torch.full((logits.shape[0] * logits.shape[1],), float(first.temperature), device=logits.device)
        chosen = sampling_logprob(logits.flatten(0, 1), generated.flatten(), temperature).view(generated.shape)
        return list(zip(generated.tolist(), chosen.tolist()))
