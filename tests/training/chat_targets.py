"""Tiny random targets with tokenizers and chat templates built here, for training-data tests (a helper module,
not a conftest.py: a second conftest would shadow `tests/conftest.py` for `from conftest import ...`).

`word_tokenizer` is a WordLevel tokenizer (every id decodes to one word); `bpe_tokenizer` a byte-level BPE one
trained on a few sentences with ChatML-style special tokens, closer to Qwen/Llama-3 tokenizers. Nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path

from hass_deploy.models.random_target import random_hf_model

WORDS = ("hello there how are you the quick brown fox jumps over lazy dog what is a good name for cat "
         "i am fine thanks tell me story once upon time").split()
WORD_SPECIALS = ["<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
WORD_VOCAB = 128

# Roles as tokens, each message closed by <|end|> (the EOS), a generation prompt that opens the assistant turn.
WORD_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")

SENTENCES = [
    "Hello there, how are you today?", "I am fine, thanks! And you?", "The quick brown fox jumps over the lazy dog.",
    "What is a good name for a cat?", "Tell me a story: once upon a time...", "Numbers 1, 2 and 3; symbols #@!",
]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BPE_VOCAB = 320


def word_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(WORD_SPECIALS + WORDS)}
    while len(vocab) < WORD_VOCAB:  # every id the model can produce decodes to a word
        vocab[f"w{len(vocab)}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="<|end|>",
                                        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    tokenizer.chat_template = chat_template
    return tokenizer


def bpe_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(SENTENCES * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = chat_template
    return tokenizer


def write_target(path: Path, tokenizer, seed: int = 0, vocab_size: int = WORD_VOCAB, **overrides) -> Path:
    """A tiny random Llama with `tokenizer` saved beside it; its EOS is the tokenizer's."""
    if tokenizer is not None:
        assert len(tokenizer) <= vocab_size
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    config = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=eos)
    random_hf_model("llama", "tiny", seed=seed, **{**config, **overrides}).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
