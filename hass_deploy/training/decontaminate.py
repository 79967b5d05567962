"""Benchmark prompts kept out of draft training data.

A record is dropped when one of its texts (any turn, user or assistant: a pasted question in an answer counts too)
shares a 13-word span with a benchmark prompt, the overlap test of GPT-3's contamination study, or is, word for
word, a whole benchmark prompt (the only test a prompt shorter than 13 words can have). Words are lower-cased runs
of letters and digits, so punctuation, case and whitespace do not hide a copy. ShareGPT holds MT-bench and Alpaca
questions pasted verbatim by its users; training a draft on them would inflate its benchmark τ.

    blocklist = Blocklist.of_files(benchmark_files())
    blocklist.matches(["some user turn", "its answer"]) -> bool
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hass_deploy.prompts import PROMPT_SETS, prompt_set_path, read_prompt_turns

SPAN = 13
WORD = re.compile(r"\w+")


def words(text: str) -> tuple[str, ...]:
    return tuple(WORD.findall(text.lower()))


def spans(tokens: tuple[str, ...], n: int = SPAN) -> Iterable[tuple[str, ...]]:
    """Every run of n consecutive words."""
    return zip(*(tokens[i:] for i in range(n)))


@dataclass(frozen=True)
class Blocklist:
    spans: frozenset[tuple[str, ...]]  # the prompts' 13-word spans
    whole: frozenset[tuple[str, ...]]  # the prompts themselves, as words
    prompts: int

    @classmethod
    def of_texts(cls, texts: Iterable[str]) -> "Blocklist":
        prompts = [words(t) for t in texts]
        return cls(frozenset(s for p in prompts for s in spans(p)), frozenset(p for p in prompts if p), len(prompts))

    @classmethod
    def of_files(cls, paths: Iterable[str | Path]) -> "Blocklist":
        """Every turn of every prompt in these files (EAGLE question files or {"prompt"} lines)."""
        return cls.of_texts(t for path in paths for t in read_prompt_turns(path))

    def matches(self, texts: Iterable[str]) -> bool:
        for text in texts:
            tokens = words(text)
            if tokens in self.whole or not self.spans.isdisjoint(spans(tokens)):
                return True
        return False


def benchmark_files() -> list[Path]:
    """The bundled MT-bench, HumanEval, GSM8K and Alpaca prompt sets that `bench` measures on."""
    return [prompt_set_path(name) for name in PROMPT_SETS]
