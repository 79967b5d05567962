"""Streaming text for a token stream: incremental detokenization and OpenAI stop strings.

A request's tokens arrive in bursts (one speculative round accepts 1..8 at once) and the server streams text as they
come. Decoding only the new tokens would be wrong twice over:

* Decoding does not compose. Byte-level BPE splits a multi-byte character over tokens (a prefix of them decodes to a
  trailing U+FFFD), and SentencePiece-style decoders drop the leading space of a sequence's first token. So tokens are
  decoded in a window that starts a few tokens back (the TGI/vLLM prefix_offset/read_offset method), and text is only
  taken up to the last complete character.
* Stop strings are matched on text, not tokens: one may span tokens or end inside a token's text, and text that could
  still grow into one is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what decode gives for the bytes of a character not yet complete


@dataclass
class TextUpdate:
    """What one `TextStream.push` released."""

    text: str  # may be "": the tokens so far end inside a character, or could be the start of a stop string
    stop_at: int | None  # how many pushed tokens were consumed, up to and including the one completing a stop string
    stop: str | None  # the stop string that matched


class TextStream:
    """The text of one completion, released as its tokens arrive.

    Released text never ends in half a character nor holds any part of a stop string. When several stop strings are
    completed by the same token, the one starting earliest wins and the text ends just before it (OpenAI's behaviour).
    Each token costs one decode of the window (a few tokens) and a stop search over the new text plus the held-back
    text, which is shorter than the longest stop string: nothing is re-decoded from the start.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, context: int = 5):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty: an empty one would match before any text")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._longest_partial = max(map(len, self._stop), default=1) - 1
        # `_window` is tokens[prefix_offset:] in TGI/vLLM terms and `_read` is read_offset - prefix_offset: the first
        # `_read` tokens are context (prompt, or text already taken) decoding to `_context_len` characters.
        self._window = list(prompt_ids)[-context:] if context > 0 else []
        self._read = len(self._window)
        self._context_len = len(self._decode(self._window))
        self._taken = 0  # characters after the context already taken (the window ends inside a character)
        self._pending = ""  # taken but held back: it could be the start of a stop string
        self._chunks: list[str] = []
        self._finished = False

    @property
    def text(self) -> str:
        """All text released so far; after `flush` (or a stop), the whole completion text."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def push(self, token_ids: Sequence[int]) -> TextUpdate:
        """Feed one round's tokens, in order. After a stop string matches, the tokens after it are ignored."""
        if self._finished:
            raise RuntimeError("TextStream.push after a stop string matched or after flush(): the stream is finished")
        released = []
        for n, token in enumerate(token_ids, 1):
            self._window.append(token)
            new = self._take_new_text()
            if not new:
                continue
            text = self._pending + new
            hits = [(at, s) for s in self._stop if (at := text.find(s)) >= 0]
            if hits:
                at, stop = min(hits, key=lambda hit: hit[0])
                released.append(text[:at])
                self._finished, self._pending = True, ""
                return self._release("".join(released), n, stop)
            keep = self._partial_stop_len(text)
            released.append(text[:len(text) - keep])
            self._pending = text[len(text) - keep:]
        return self._release("".join(released), None, None)

    def flush(self) -> str:
        """Generation ended for another reason (EOS, length): release everything held back, as decode gives it
        (a trailing incomplete character comes out as U+FFFD). Returns "" after a stop."""
        if self._finished:
            return ""
        text = self._pending + self._decode(self._window)[self._context_len + self._taken:]
        self._finished, self._pending = True, ""
        return self._release(text, None, None).text

    def _release(self, text: str, stop_at: int | None, stop: str | None) -> TextUpdate:
        self._chunks.append(text)
        return TextUpdate(text, stop_at, stop)

    def _take_new_text(self) -> str:
        """The window's text past what was taken, up to its last complete character; slides the window forward
        once its text is complete, so that the next decode starts a few tokens back, not at the beginning."""
        full = self._decode(self._window)
        complete = full.rstrip(REPLACEMENT)
        new = complete[self._context_len + self._taken:]
        self._taken += len(new)
        if len(complete) == len(full) > self._context_len:
            self._window = self._window[self._read:]
            self._read = len(self._window)
            self._context_len, self._taken = len(self._decode(self._window)), 0
        return new

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a stop string (it must wait for more text)."""
        for keep in range(min(self._longest_partial, len(text)), 0, -1):
            if any(s.startswith(text[-keep:]) for s in self._stop):
                return keep
        return 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
