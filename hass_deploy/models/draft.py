"""The EAGLE-1/2 draft head that HASS trains (algorithm.md §1).

    e = Embed(x_{t+1})                 # the target's frozen embedding
    h = fc(cat([e, f_t], -1))          # embedding FIRST, feature SECOND; 2H -> H, no activation
    g = DecoderLayer0(h)               # one Llama layer WITHOUT input norm
    logits = target.lm_head(g)         # no final norm; the target's frozen head

The pair (f_t, x_{t+1}) sits at RoPE position t, and g_t is trained to be ≈ f_{t+1}. The head owns no lm_head:
callers apply the target's, so a draft costs one layer plus one vocabulary projection per step.

A reduced draft vocabulary (FR-Spec; EAGLE-3's token map) scores only N of the target's V tokens, the most
frequent ones of the training data: `scoring_head(lm_head)` is the target head's N rows, and `target_ids` maps a
row index back to the target token. The map is stored as EAGLE-3 stores it, so engines that load EAGLE-3 token
maps read ours: `d2t` int64 [N] (draft index i is target token i + d2t[i]) and `t2d` bool [V]. The projection,
at V x H the draft's dominant cost (576 x 49152 for SmolLM2), shrinks by V / N; verification keeps the whole
vocabulary, and tokens outside the N simply are never proposed.
"""

from __future__ import annotations

import torch
from torch import nn

from hass_deploy.models.target import DecoderLayer, KVStore, ModelConfig, ReadOnlyKV, Rotary, run_layers


class DraftHead(nn.Module):
    """Parameter names are EAGLE's flat checkpoint keys (`fc.weight`, `layers.0.*`, `embed_tokens.weight`)."""

    def __init__(self, config: ModelConfig, fc_bias: bool = False, draft_vocab: int | None = None):
        super().__init__()
        if config.num_layers != 1:
            raise ValueError(f"an EAGLE/HASS draft head has exactly one layer, not {config.num_layers}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # a frozen copy of the target's
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=fc_bias)
        self.layers = nn.ModuleList([DecoderLayer(config, 0, input_norm=False)])
        self.rotary = Rotary(config)
        if draft_vocab is not None:
            if not 1 <= draft_vocab <= config.vocab_size:
                raise ValueError(f"a draft vocabulary of {draft_vocab} tokens does not fit the target's "
                                 f"{config.vocab_size}")
            # Target ids 0..N-1 until set_vocabulary (no data-dependent work here: loading builds on "meta").
            self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.int64))
            self.register_buffer("t2d", torch.arange(config.vocab_size) < draft_vocab)

    @property
    def fc_bias(self) -> bool:
        return self.fc.bias is not None

    @property
    def draft_vocab(self) -> int | None:
        """N, the tokens the draft scores (None: the target's whole vocabulary)."""
        return None if getattr(self, "d2t", None) is None else self.d2t.numel()

    def vocabulary(self) -> torch.Tensor | None:
        """[N] the target ids the draft scores, ascending (None: all of them)."""
        if self.draft_vocab is None:
            return None
        return torch.arange(self.draft_vocab, device=self.d2t.device) + self.d2t

    def set_vocabulary(self, ids: torch.Tensor) -> None:
        """Score exactly the target tokens `ids` ([N], distinct; stored ascending)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).flatten().sort().values.to(self.d2t.device)
        if ids.numel() != self.draft_vocab or ids.unique().numel() != ids.numel() or ids.min() < 0 \
                or ids.max() >= self.config.vocab_size:
            raise ValueError(f"a draft vocabulary needs {self.draft_vocab} distinct target ids below "
                             f"{self.config.vocab_size}")
        with torch.no_grad():
            self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
            self.t2d.zero_()
            self.t2d[ids] = True

    def check_vocabulary(self) -> None:
        """Refuse a token map whose d2t and t2d disagree, or that names a token twice or outside the target's."""
        ids = self.vocabulary()
        if ids is None:
            return
        if (ids.diff() <= 0).any() or ids[0] < 0 or ids[-1] >= self.config.vocab_size or \
                not torch.equal(self.t2d.nonzero().flatten(), ids):
            raise ValueError("its token map (d2t, t2d) is inconsistent")

    def scoring_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of a [V, ...] head tensor the draft scores with: [V, ...] itself, or its [N, ...] rows."""
        ids = self.vocabulary()
        return weight if ids is None else weight[ids.to(weight.device)]

    def scoring_head(self, lm_head: nn.Linear) -> nn.Linear:
        """The projection the draft scores with: the target's `lm_head` itself, or a copy of its N rows."""
        if self.draft_vocab is None:
            return lm_head
        rows = nn.Linear(lm_head.in_features, self.draft_vocab, bias=lm_head.bias is not None,
                         device=lm_head.weight.device, dtype=lm_head.weight.dtype)
        with torch.no_grad():
            rows.weight.copy_(self.scoring_weight(lm_head.weight))
            if lm_head.bias is not None:
                rows.bias.copy_(self.scoring_weight(lm_head.bias))
        return rows.requires_grad_(False)

    def target_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of `scoring_head` -> target token ids (the identity without a reduced vocabulary)."""
        return indices if self.draft_vocab is None else indices + self.d2t.to(indices.device)[indices]

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tree_mask: torch.Tensor | None = None, kv: KVStore | ReadOnlyKV | None = None,
                cache_len: int | torch.Tensor = 0, kv_len: int | None = None) -> torch.Tensor:
        """Predict the next target features.

        Args:
            features: [B, T, H] target post-norm features f_t (or the draft's own predictions of them).
            input_ids: [B, T] the token after each feature, x_{t+1}.
            position_ids: [B, T] RoPE position t of each pair.
            tree_mask, kv, cache_len, kv_len: as for the target (`Transformer.forward`).

        Returns:
            [B, T, H] predicted features g_t ≈ f_{t+1}.
        """
        fused = self.fc(torch.cat([self.embed_tokens(input_ids), features], dim=-1))  # [B, T, H]
        return run_layers(self.layers, self.rotary, fused, position_ids, tree_mask, kv, cache_len, kv_len=kv_len)
