"""The server's model runner: one worker thread that serves generation requests in order, off the event loop, with
a pool of prompt caches so that each conversation's new turn prefills only what is new.

A request (`Engine.submit`) carries `stream_generate`'s arguments; its chunks come back through an asyncio queue on
the caller's loop, ending with `DONE` or the exception that ended it. `Job.cancel()` (a client that went away) stops
the generation at its next token; the generator's own rollback leaves the prompt cache consistent. The pool holds up
to `max_caches` prompt caches, within `max_cache_bytes` together (agents resend the whole history each turn, with or
without past reasoning): a request takes the one sharing the longest prefix with its rendered prompt (if it covers
half of the shorter of the two: conversations that merely open alike keep a cache each), else a new one, else the
least recently used.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .generator import GenerationChunk, build_prompt, stream_generate
from .prompt_cache import MAX_SNAPSHOT_BYTES, PromptCache

DONE = object()  # the end of a job's chunks


@dataclass
class Job:
    messages: Any  # OpenAI-style messages, or token ids for a raw completion
    kwargs: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0  # chunks generated for it

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)

    async def stream(self) -> AsyncIterator[GenerationChunk]:
        """The job's chunks as they come; raises what ended the generation, if it failed."""
        while True:
            item = await self.chunks.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Engine:
    def __init__(self, model: Any, processor: Any, max_caches: int = 4,
                 max_snapshot_bytes: int = MAX_SNAPSHOT_BYTES, max_cache_bytes: int | None = None,
                 kv_bits: int | None = None, kv_group_size: int = 64):
        if max_caches < 1:
            raise ValueError(f"max_caches must be >= 1, got {max_caches}")
        self.model, self.processor = model, processor
        _materialize(model)
        self.max_caches, self.max_snapshot_bytes = max_caches, max_snapshot_bytes
        self.max_cache_bytes = max_cache_bytes  # all the pool's caches together (None: only `max_caches` bounds it)
        self.kv = {"kv_bits": kv_bits, "kv_group_size": kv_group_size}  # how the pool's caches store attention KV
        self.caches: list[tuple[float, PromptCache]] = []  # (last used, cache)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.finished: deque[Job] = deque(maxlen=64)  # the latest jobs served, for inspection
        self.served = 0
        self.worker = threading.Thread(target=self._serve, name="mlx_qwen36-engine", daemon=True)
        self.worker.start()

    def submit(self, messages: Any, **kwargs: Any) -> Job:
        job = Job(messages, kwargs, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=30)

    @property
    def pending(self) -> int:
        return self.jobs.qsize()

    def _serve(self) -> None:
        # MLX streams belong to the thread that made them: this thread computes on its own.
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                job.put(DONE)
                continue
            try:
                pc = self._cache_for(job)
                chunks = stream_generate(self.model, self.processor, job.messages, prompt_cache=pc, **job.kwargs)
                try:
                    for chunk in chunks:
                        if job.cancelled.is_set():
                            break
                        job.produced += 1
                        job.put(chunk)
                finally:
                    chunks.close()  # at once: its rollback leaves the prompt cache consistent
                job.put(DONE)
            except Exception as error:  # a bad request found late (media, context length): the caller reports it
                job.put(error)
            self.finished.append(job)
            self.served += 1
            self._evict()

    def _cache_for(self, job: Job) -> PromptCache:
        """The pool's cache sharing the longest prefix with the job's prompt (else a new one, or the least recently
        used), marked as used now."""
        k = job.kwargs
        try:
            ids, _ = build_prompt(self.processor, job.messages, k.get("tools"), k.get("enable_thinking", True),
                                  k.get("preserve_thinking", False))
        except Exception:  # stream_generate reports it, with the cache it gets
            ids = []
        best, shared = None, 0
        for i, (_, pc) in enumerate(self.caches):
            n = _common_prefix(pc.tokens, ids)
            # Another conversation that only opens the same way (a system prompt, a greeting) keeps its cache:
            # a cache is taken when it covers at least half of the shorter of the two.
            if n > shared and 2 * n >= min(len(pc.tokens), len(ids)):
                best, shared = i, n
        if best is None:
            if len(self.caches) < self.max_caches:
                self.caches.append((0.0, PromptCache(self.model, self.max_snapshot_bytes, **self.kv)))
                best = len(self.caches) - 1
            else:
                best = min(range(len(self.caches)), key=lambda i: self.caches[i][0])
        pc = self.caches[best][1]
        self.caches[best] = (time.monotonic(), pc)
        return pc


    def _evict(self) -> None:
        """Drop least recently used caches while the pool is over its memory budget (the latest one stays)."""
        if self.max_cache_bytes is None:
            return
        while len(self.caches) > 1 and sum(pc.nbytes for _, pc in self.caches) > self.max_cache_bytes:
            self.caches.pop(min(range(len(self.caches)), key=lambda i: self.caches[i][0]))

    @property
    def cache_bytes(self) -> int:
        return sum(pc.nbytes for _, pc in self.caches)


def _materialize(model: Any) -> None:
    """Evaluate every array the model holds, parameters or not (rotary tables, stored layouts): an unevaluated
    array belongs to the stream of the thread that made it, and the worker thread has streams of its own."""
    found: list[mx.array] = []

    def collect(value: Any) -> None:
        if isinstance(value, mx.array):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)

    if hasattr(model, "named_modules"):
        for _, module in model.named_modules():
            collect(dict(module))
            collect(module.__dict__)
    mx.eval(found)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
