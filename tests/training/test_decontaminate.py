"""Keeping benchmark prompts out of training data: 13-word spans and whole prompts, whatever the case, spacing or
punctuation; nothing else."""

from __future__ import annotations

import json

from hass_deploy.prompts import PROMPT_SETS, read_prompt_file, read_prompt_turns
from hass_deploy.training.decontaminate import SPAN, Blocklist, benchmark_files, words

LONG = ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences and "
        "must-see attractions.")
SHORT = "Calculate the atomic mass for lithium."


def test_a_shared_13_word_span_or_a_whole_prompt_matches():
    blocklist = Blocklist.of_texts([LONG, SHORT])
    span = " ".join(words(LONG)[2:2 + SPAN])
    assert blocklist.matches([f"Please, {span.upper()}!!  Thanks."])  # a copy inside other text, case and marks aside
    assert not blocklist.matches([" ".join(words(LONG)[2:1 + SPAN])])  # 12 of its words are not enough
    assert blocklist.matches(["hi", "calculate  the ATOMIC mass, for lithium"])  # any text of the record
    assert not blocklist.matches(["Calculate the atomic mass for lithium and sodium."])  # a short prompt: whole only
    assert not blocklist.matches(["", "an unrelated question about the weather in Hawaii"])


def test_the_bundled_benchmark_sets_are_read_whole():
    files = benchmark_files()
    assert [f.stem for f in files] == list(PROMPT_SETS) and all(f.is_file() for f in files)
    for name in PROMPT_SETS:  # each set by name, as --prompts takes it; MT-bench questions have two turns
        assert len(read_prompt_file(name)) == 80
    mt_bench = read_prompt_turns("mt_bench")
    assert len(mt_bench) == 160 and LONG in mt_bench
    blocklist = Blocklist.of_files(files)
    assert blocklist.prompts == sum(len(read_prompt_turns(n)) for n in PROMPT_SETS)
    first = json.loads(files[2].read_text().splitlines()[0])["turns"][0]  # a GSM8K problem, pasted into a chat
    assert blocklist.matches([f"Can you help me with this? {first}"])
