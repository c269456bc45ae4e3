"""Streaming detokenizer: token ids in, finalised UTF-8 text deltas out.

Qwen3.6 uses byte-level BPE, so one character can be split across tokens (a Chinese character is 3 bytes, an
emoji 4, and a ZWJ family several emoji joined by U+200D). Decoding the tokens seen so far then ends in U+FFFD,
the replacement character, until the rest of the bytes arrive. Streamed text must never contain such a
placeholder that the full decode would not, and the joined deltas must equal `processor.decode(all_ids)`.

How: keep a small window of token ids since the last point where the decoded text ended on a complete
character. Each new token re-decodes only that window. The text up to the trailing run of U+FFFD is final, so it
is emitted at once. When the window decodes without a trailing U+FFFD, the whole window is emitted and
dropped. Splitting there is exact: after a complete character a UTF-8 decoder is back in its initial state, so
decoding the rest separately gives the same text. The window is usually 1 to 3 tokens, so each token costs
O(1). Only a long run of invalid bytes could grow it; `_trim_window` then cuts it at a split point proven safe.

The tokenizer's own `decode` does the work, so added tokens (`<think>`, `<|im_end|>`) and `skip_special_tokens`
behave exactly as in the full decode.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

__all__ = ["StreamingDetokenizer"]

REPLACEMENT = "\ufffd"
# A window this long while still ending in U+FFFD means invalid bytes; cut it so a token stays O(1).
MAX_WINDOW = 32
# How far back from the window's end to look for a safe cut. A pending character is at most 3 bytes, so a cut
# point lies within the last few tokens unless tokens themselves straddle odd byte runs.
CUT_SEARCH = 8


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def _decoder_of(source: Any) -> _Decoder:
    """The object whose `decode(ids, skip_special_tokens=...)` we call: a Processor's tokenizer, or the source."""
    tokenizer = getattr(source, "tokenizer", None)
    if tokenizer is not None and callable(getattr(tokenizer, "decode", None)):
        return tokenizer
    if callable(getattr(source, "decode", None)):
        return source
    raise TypeError(f"expected a Processor or a tokenizer with decode(), got {type(source).__name__}")


class StreamingDetokenizer:
    """Turns generated token ids into text deltas that are always valid, complete UTF-8.

    `source` is a `Processor` or a `tokenizers.Tokenizer` (anything with `decode(ids, skip_special_tokens=)`).
    `skip_special_tokens=True` drops special tokens such as `<|im_end|>`; `<think>` and `<tool_call>` are not
    special and always come through. The joined deltas of `add_token` calls plus `finalize()` equal
    `decode(all_ids, skip_special_tokens=...)`.
    """

    def __init__(self, source: Any, skip_special_tokens: bool = False) -> None:
        self._tokenizer = _decoder_of(source)
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self._window: list[int] = []
        self._emitted = 0  # characters of decode(self._window) already returned

    def reset(self) -> None:
        """Forget all tokens, ready for a new sequence."""
        self.tokens = []
        self._window = []
        self._emitted = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Add one generated token; return the text it finalised (often "", e.g. mid-character)."""
        token_id = int(token_id)
        self.tokens.append(token_id)
        self._window.append(token_id)
        text = self._decode(self._window)
        if not text.endswith(REPLACEMENT):
            delta = text[self._emitted :]
            self._window.clear()
            self._emitted = 0
            return delta
        # Everything before the trailing U+FFFD run is final: a complete character is never re-read.
        stable = len(text.rstrip(REPLACEMENT))
        delta = text[self._emitted : stable] if stable > self._emitted else ""
        self._emitted = max(self._emitted, stable)
        if len(self._window) > MAX_WINDOW:
            delta += self._trim_window(text)
        return delta

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Add several tokens; return the joined deltas."""
        return "".join(self.add_token(token_id) for token_id in token_ids)

    def finalize(self) -> str:
        """Flush what is held back (an incomplete character decodes to U+FFFD, as in the full decode)."""
        delta = self._decode(self._window)[self._emitted :] if self._window else ""
        self._window = []
        self._emitted = 0
        return delta

    def _trim_window(self, text: str) -> str:
        """Drop a finished head off a long window; return any of its text not yet emitted.

        A cut at k is safe when decode(head) + decode(tail) == decode(window): UTF-8 decoding with replacement
        only joins bytes across the cut when the head ends in an incomplete character that the tail's first
        bytes continue, and then the two sides decode to different text (one character or one U+FFFD where the
        split gives two or more). Equality therefore means the head is final whatever tokens come next.
        """
        window = self._window
        for k in range(len(window) - 1, max(0, len(window) - CUT_SEARCH), -1):
            head = self._decode(window[:k])
            if head + self._decode(window[k:]) != text:
                continue
            delta = head[self._emitted :] if self._emitted < len(head) else ""
            self._emitted = max(0, self._emitted - len(head))
            self._window = window[k:]
            return delta
        return ""
