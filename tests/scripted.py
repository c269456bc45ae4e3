"""A model that runs the tiny model's layers and cache but whose logits follow a script (to test the plumbing)."""

from __future__ import annotations

import mlx.core as mx


class Scripted:
    """The tiny model's cache and state, but logits that force a scripted token sequence."""

    def __init__(self, real, tokens: list[int]):
        self.real, self.tokens, self.config, self.model = real, list(tokens), real.config, real.model

    def make_cache(self):
        return self.real.make_cache()

    def __contains__(self, name):
        return name in self.real

    def logits(self, hidden):
        nxt = self.tokens.pop(0) if self.tokens else 0
        return mx.zeros((*hidden.shape[:-1], self.config.text.vocab_size)).at[..., nxt].add(100.0)

    def __call__(self, x, cache=None, position_ids=None, **kwargs):
        return self.logits(self.real.model(x, cache, position_ids)[:, -1:])
