"""`TextStream`: streamed text equals what decode gives, never half a character, and OpenAI stop strings.

Tokenizers are built here with the `tokenizers` library (nothing downloaded): a byte-level BPE trained on text with
multi-byte characters and so few merges that characters split over tokens, a WordLevel one (no decoder: words are
joined by spaces) and a SentencePiece-style one (Metaspace), whose decode drops the first token's leading space.
"""

from __future__ import annotations

import functools
import random

import pytest

from hass_deploy.serving.text import TextStream

REPLACEMENT = "\ufffd"
UNICODE_TEXT = "café ☕ naïve 日本語 hello there"
SENTENCES = [UNICODE_TEXT, "naïve café, 日本語 is fun ☕☕", "Hello world, how are you?"]
WORDS = "hello there how are you the quick brown fox".split()


def _fast(backend, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.fixture(scope="module")
def byte_bpe():
    """Byte-level BPE with few merges: 'é' is two byte tokens, '日' spans tokens, and 'naÃ' ends inside 'ï'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES, trainer)
    return _fast(backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def words():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(["<unk>", "<|end|>"] + WORDS)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return _fast(backend, unk_token="<unk>", eos_token="<|end|>")


@pytest.fixture(scope="module")
def metaspace():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"], show_progress=False)
    backend.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    return _fast(backend, unk_token="<unk>", eos_token="</s>")


def bursts(rng: random.Random, ids: list[int]):
    """`ids` cut into rounds of 1..8 tokens, as speculative decoding accepts them."""
    i = 0
    while i < len(ids):
        n = rng.randint(1, 8)
        yield ids[i:i + n]
        i += n


def encoded_text(rng: random.Random, tokenizer, n_words: int) -> list[int]:
    """Token ids of random text from the tokenizer's own words: valid UTF-8, but characters split over tokens."""
    pieces = [w for s in SENTENCES for w in s.split()] + WORDS
    return tokenizer.encode(" ".join(rng.choice(pieces) for _ in range(n_words)), add_special_tokens=False)


@pytest.mark.parametrize("name", ["byte_bpe", "words", "metaspace"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_text_is_decode_released_as_early_as_whole_characters_allow(request, name, skip_special_tokens):
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(0)
    split_chars = 0
    for trial in range(60):
        ids = ([rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 30))] if trial % 2
               else encoded_text(rng, tokenizer, rng.randint(1, 12)))
        stream, chunks, consumed = TextStream(tokenizer, skip_special_tokens=skip_special_tokens), [], 0
        for burst in bursts(rng, ids):
            chunks.append(stream.push(burst).text)
            consumed += len(burst)
            so_far = tokenizer.decode(ids[:consumed], skip_special_tokens=skip_special_tokens)
            complete = so_far.rstrip(REPLACEMENT)
            split_chars += complete != so_far
            if REPLACEMENT not in complete:  # only garbage bytes (random ids) may decode to U+FFFD mid-text
                assert stream.text == complete, (ids[:consumed], chunks)
        chunks.append(stream.flush())
        assert "".join(chunks) == stream.text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if trial % 2 == 0:
            assert not any(REPLACEMENT in chunk for chunk in chunks)
    assert name != "byte_bpe" or split_chars > 10  # the byte tokenizer really did split characters over rounds


def test_a_split_character_is_held_until_it_completes(byte_bpe):
    ids = byte_bpe.encode("café", add_special_tokens=False)
    assert byte_bpe.decode(ids[:-1]).endswith(REPLACEMENT)  # 'é' is split: its first byte alone decodes to U+FFFD
    stream = TextStream(byte_bpe)
    assert stream.push(ids[:-1]).text == "caf"
    assert stream.push(ids[-1:]).text == "é"
    assert stream.flush() == ""


def test_a_trailing_incomplete_character_is_flushed_as_decode_gives_it(byte_bpe):
    ids = byte_bpe.encode("café", add_special_tokens=False)[:-1]
    stream = TextStream(byte_bpe)
    stream.push(ids)
    assert stream.flush() == REPLACEMENT and stream.text == byte_bpe.decode(ids)


def test_prompt_context_keeps_the_completion_leading_space(metaspace):
    prompt = metaspace.encode("hello there", add_special_tokens=False)
    completion = metaspace.encode("how are you", add_special_tokens=False)
    expected = metaspace.decode(prompt + completion)[len(metaspace.decode(prompt)):]
    assert expected == " how are you"

    stream = TextStream(metaspace, prompt_ids=prompt)
    assert stream.push(completion[:1]).text == " how"
    stream.push(completion[1:])
    stream.flush()
    assert stream.text == expected

    without_context = TextStream(metaspace, prompt_ids=prompt, context=0)  # decoding from the first token drops it
    without_context.push(completion)
    without_context.flush()
    assert without_context.text == "how are you"


def test_decoding_only_looks_a_few_tokens_back(words):
    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens):
            self.longest = max(self.longest, len(ids))
            return words.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = Counting()
    stream = TextStream(counting, prompt_ids=words.encode("the quick brown fox jumps"), context=3)
    for _ in range(100):
        stream.push(words.encode("hello there how are you"))
    assert stream.flush() == "" and stream.text.count("hello") == 100
    assert counting.longest <= 3 + 1


def stream_all(tokenizer, ids, stop, sizes):
    """Push `ids` in rounds of `sizes` tokens until a stop; returns the stream, its updates and the tokens consumed."""
    stream, updates, consumed = TextStream(tokenizer, stop=stop), [], 0
    for n in sizes:
        updates.append(stream.push(ids[consumed:consumed + n]))
        if updates[-1].stop is not None:
            return stream, updates, consumed + updates[-1].stop_at
        consumed += len(ids[consumed:consumed + n])
    return stream, updates, consumed


@pytest.mark.parametrize(("stop", "text", "stop_at"), [
    (["her"], "hello t", 2),           # inside one token's text: stops at that token, cut inside it
    (["the"], "hello ", 2),            # ends inside a token's text
    (["o th"], "hell", 2),             # spans a token boundary
    (["re", "the"], "hello ", 2),      # both completed by 'there': the earlier-starting one wins, not list order
    (["how", "hello there how"], "", 3),
    (["you"], "hello there how are ", 5),
])
def test_stop_string_in_one_push(words, stop, text, stop_at):
    ids = words.encode("hello there how are you the fox")
    stream = TextStream(words, stop=stop)
    update = stream.push(ids)
    assert (update.text, update.stop_at, update.stop) == (text, stop_at, min(stop, key=words.decode(ids).find))
    assert stream.text == text
    assert stream.flush() == ""


def test_stop_string_spanning_two_pushes_is_held_back_then_cut(words):
    ids = words.encode("hello there how")
    stream = TextStream(words, stop=["o th"])
    first = stream.push(ids[:1])
    assert (first.text, first.stop_at) == ("hell", None)  # 'o' could start 'o th'
    second = stream.push(ids[1:])
    assert (second.text, second.stop_at, second.stop) == ("", 1, "o th")
    assert stream.text == "hell"


def test_a_partial_match_that_is_not_a_stop_is_released_on_the_next_push(words):
    ids = words.encode("hello there how are you")
    stream = TextStream(words, stop=["how is"])
    assert stream.push(ids[:3]).text == "hello there "
    assert stream.push(ids[3:4]).text == "how are"
    assert stream.push(ids[4:]).text == " you"


def test_held_back_text_is_released_by_flush_when_no_stop_occurs(words):
    stream = TextStream(words, stop=["you there"])
    update = stream.push(words.encode("hello there how are you"))
    assert (update.text, update.stop_at) == ("hello there how are ", None)
    assert stream.flush() == "you"
    assert stream.text == "hello there how are you"


def test_stop_string_with_a_character_split_over_byte_tokens(byte_bpe):
    ids = byte_bpe.encode(UNICODE_TEXT, add_special_tokens=False)
    first = next(k for k in range(len(ids) + 1) if "日本" in byte_bpe.decode(ids[:k]))
    assert byte_bpe.decode(ids[:first - 1]).endswith(REPLACEMENT)  # '本' is completed by token `first`
    stream, updates, consumed = stream_all(byte_bpe, ids, ["日本"], [3] * len(ids))
    assert (updates[-1].stop, consumed) == ("日本", first)
    assert stream.text == "café ☕ naïve " and not any(REPLACEMENT in u.text for u in updates)


def test_stop_string_ending_inside_a_token_that_ends_inside_a_character(byte_bpe):
    ids = byte_bpe.encode(UNICODE_TEXT, add_special_tokens=False)
    tokens = byte_bpe.convert_ids_to_tokens(ids)
    at = tokens.index("naÃ")  # 'na' and the first byte of 'ï'
    update = TextStream(byte_bpe, stop=["na"]).push(ids)
    assert (update.text, update.stop_at) == ("café ☕ ", at + 1)


@pytest.mark.parametrize("name", ["byte_bpe", "words"])
def test_random_stops_cut_where_decode_first_contains_one(request, name):
    """Oracle: the run stops at the first token k whose prefix decode contains a stop string, and the text is that
    decode up to the earliest-starting stop string in it."""
    tokenizer = request.getfixturevalue(name)
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)  # as TextStream does by default
    rng = random.Random(1)
    stopped = 0
    for _ in range(80):
        ids = encoded_text(rng, tokenizer, rng.randint(2, 12))
        full = decode(ids)
        if not full:  # words outside the WordLevel vocabulary are <unk>, a special token
            continue
        stop = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(full))
            stop.append(full[start:start + rng.randint(1, 6)] if rng.random() < 0.8 else "zq")
        stream, updates, consumed = stream_all(tokenizer, ids, stop, [rng.randint(1, 8) for _ in ids])
        hit = next((k for k in range(1, len(ids) + 1) if any(s in decode(ids[:k]) for s in stop)), None)
        if hit is None:
            assert all(u.stop is None for u in updates)
            stream.flush()
            assert stream.text == full
            continue
        stopped += 1
        prefix = decode(ids[:hit])
        expected = min(prefix.find(s) for s in stop if s in prefix)
        assert stream.text == prefix[:expected] == "".join(u.text for u in updates)
        assert consumed == hit
        assert updates[-1].stop in stop and prefix.find(updates[-1].stop) == expected
        assert not any(s in stream.text for s in stop)
    assert stopped > 40


def test_push_after_stop_or_flush_raises(words):
    stream = TextStream(words, stop=["there"])
    assert stream.push(words.encode("hello there how")).stop == "there"
    with pytest.raises(RuntimeError, match="finished"):
        stream.push(words.encode("you"))
    flushed = TextStream(words)
    flushed.flush()
    with pytest.raises(RuntimeError, match="finished"):
        flushed.push(words.encode("you"))


def test_empty_stop_string_is_rejected(words):
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(words, stop=["you", ""])
