"""One batched generate over requests that may each use a different adapter.

The prompt, left padding and decoding are `vltune.eval.grounding.generate_answers`' (what `vltune infer`
runs), so a greedy answer here equals `vltune infer`'s for the same conversation and adapter. The rows of
one call pass PEFT's `adapter_names=` (one adapter, or "__base__", per row). A streamer sees each step's
tokens, which gives per-row token counts, per-row max_tokens and the streamed deltas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..coords import from_model_coords, parse_click
from ..generation import generate_answers


@dataclass(eq=False)
class Job:
    """One request on its way through the queue; the engine fills `text`, `tokens`, `finish_reason`."""

    sample: object
    adapter: str | None
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    on_delta: Callable[[str], None] | None = None  # streaming: called (from the worker thread) with new text
    done: Callable | None = None  # set by the batcher: done(job, error) once answered
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "stop"
    streamed: str = ""

    @property
    def sampling(self) -> bool:
        return bool(self.temperature) or (self.top_p is not None and self.top_p < 1)

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share a generate call: all greedy ones do, whatever their adapter."""
        return ("greedy",) if not self.sampling else ("sample", self.temperature, self.top_p, self.seed)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to (without) the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class _RowTokens:
    """A `generate` streamer that keeps each row's new tokens, up to its own max_tokens or end token."""

    def __init__(self, jobs: list[Job], eos: set[int], pad: int | None, decode: Callable[[list[int]], str]):
        self.jobs, self.eos, self.pad, self.decode = jobs, eos, pad, decode
        self.done = [False] * len(jobs)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the (left-padded) prompts
            self.prompt_seen = True
            for job, row in zip(self.jobs, value.tolist()):
                lead = next((k for k, t in enumerate(row) if t != self.pad), len(row))
                job.prompt_tokens = len(row) - lead
            return
        for i, token in enumerate(value.reshape(len(self.jobs), -1)[:, 0].tolist()):
            job = self.jobs[i]
            if self.done[i]:
                continue
            if token in self.eos:
                self.done[i] = True
                continue
            job.tokens.append(token)
            if len(job.tokens) >= job.max_tokens:
                self.done[i] = True
                job.finish_reason = "length"
            if job.on_delta is not None:
                self._stream(job)

    def _stream(self, job: Job) -> None:
        text, _ = cut_at_stop(self.decode(job.tokens), job.stops)
        hold = max((len(s) - 1 for s in job.stops), default=0)  # a stop string may be starting
        safe = text[:len(text) - hold] if hold else text
        if safe.endswith("\ufffd"):  # an unfinished multi-byte character
            return
        if safe.startswith(job.streamed) and len(safe) > len(job.streamed):
            job.on_delta(safe[len(job.streamed):])
            job.streamed = safe

    def end(self) -> None:
        pass


class Engine:
    """Runs batches of jobs on the global model + adapters of an `AdapterPool`."""

    def __init__(self, pool, processor, convention: str):
        self.pool, self.processor, self.convention = pool, processor, convention
        tok = processor.tokenizer
        eos = pool.base.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tok.eos_token_id])
        self.pad = tok.pad_token_id

    def decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True)

    def run(self, jobs: list[Job]) -> list[tuple[int, int, float]]:
        """Answer every job (they share one batch_key), one generate call per adapter-compatible group;
        returns (rows, generated tokens, seconds) per generate call."""
        calls = []
        for idx in self.pool.groups([j.adapter for j in jobs]):
            group = [jobs[i] for i in idx]
            start = time.monotonic()
            self._generate(group)
            calls.append((len(group), sum(len(j.tokens) for j in group), time.monotonic() - start))
        return calls

    def _generate(self, jobs: list[Job]) -> None:
        model, adapter_names = self.pool.prepare([j.adapter for j in jobs])
        first = jobs[0]
        gen: dict = {}
        if first.sampling:
            gen.update(do_sample=True, temperature=first.temperature or 1.0, top_p=first.top_p or 1.0, top_k=None)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        if adapter_names is not None:
            gen["adapter_names"] = adapter_names
        longest = max(j.max_tokens for j in jobs)
        streamer = _RowTokens(jobs, self.eos, self.pad, self.decode)
        answers = generate_answers(model, self.processor, [j.sample for j in jobs], batch_size=len(jobs),
                                   max_new_tokens=longest, streamer=streamer, **gen)
        for job, answer in zip(jobs, answers):
            # rows that ran to the call's length are generate_answers' own text; shorter caps are cut from tokens
            text = answer if job.max_tokens == longest else self.decode(job.tokens)
            text, stopped = cut_at_stop(text, job.stops)
            if stopped:
                job.finish_reason = "stop"
            job.text = text
            if job.on_delta is not None and text.startswith(job.streamed) and len(text) > len(job.streamed):
                job.on_delta(text[len(job.streamed):])
                job.streamed = text

    def click(self, text: str, image) -> dict | None:
        """The answer's click in the original screenshot's pixels (None without a click or an image)."""
        parsed = parse_click(text)
        if parsed is None or image is None:
            return None
        w, h = image.size
        x, y = from_model_coords(parsed[0], parsed[1], w, h, self.convention, self.processor)
        return {"x": x, "y": y, "model_x": parsed[0], "model_y": parsed[1], "convention": self.convention,
                "image_size": [w, h]}
