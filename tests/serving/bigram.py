"""A tiny target whose greedy output is known in advance: a byte-level tokenizer (one token per byte, so "é" and
"☕" are split over 2 and 3 tokens) and a random Llama turned into a bigram model that, from any byte of CYCLE,
writes CYCLE on forever ("café☕!café☕!..."). The serving tests need text they can predict: stop strings that span
tokens and hold multi-byte characters, and streams whose every chunk can be checked.

How: every layer's output projections (o_proj, down_proj) are zeroed, so the residual stream is the current
token's embedding; the untied lm_head row of byte f(a) is a's normalised embedding, so a's own logit is
sqrt(H) * scale and every other's is a random cosine of that (|cos| < 0.5 at H = 64). The attention and MLP still
run (KV rows are written and read as for any model); they just do not change the answer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hass_deploy.models.random_target import random_hf_model

CYCLE = "café☕!"  # 9 distinct bytes: the bigram map is a function
VOCAB = 264  # 256 bytes + 3 specials, rounded up
SCALE = 4.0


def byte_tokenizer(chat_template: str | None = None):
    """Byte-level BPE with no merges: token = byte (plus <|endoftext|>, <|im_start|>, <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=256 + len(specials), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["x"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = chat_template
    return tokenizer


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_bigram_target(path: Path, seed: int = 0) -> Path:
    tokenizer = byte_tokenizer(CHATML)
    cycle = tokenizer(CYCLE)["input_ids"]
    assert len(cycle) == len(set(cycle)) == len(CYCLE.encode()), cycle
    model = random_hf_model("llama", "tiny", seed=seed, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512, bos_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            model.lm_head.weight[b] = SCALE * embed[a] / embed[a].norm()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_oracle_draft(target_path: Path, out: Path) -> Path:
    """A draft head that predicts the bigram target exactly: fc copies the next token's embedding through (the
    layer's output projections are zeroed), and the target's lm_head maps it to the byte after it. Every draft
    token is accepted, so speculation's counters have something to count."""
    from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, init_draft, save_draft, target_identity
    from hass_deploy.models.loading import load_target

    target = load_target(target_path, tokenizer=False)
    head = init_draft(target, seed=0)
    hidden = head.fc.weight.shape[0]
    with torch.no_grad():
        head.fc.weight.zero_()
        # Scaled so that the draft is as sure as the target (its output has the norm of the target's features).
        head.fc.weight[:, :hidden] = torch.eye(hidden) * hidden ** 0.5 / head.embed_tokens.weight.norm(dim=-1).mean()
        head.layers[0].self_attn.o_proj.weight.zero_()
        head.layers[0].mlp.down_proj.weight.zero_()
    return save_draft(head, out, DraftMetadata(FORMAT_VERSION, "oracle", target_identity(target)))
