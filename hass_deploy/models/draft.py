"""The EAGLE-1/2 draft head that HASS trains (algorithm.md §1).

    e = Embed(x_{t+1})                 # the target's frozen embedding
    h = fc(cat([e, f_t], -1))          # embedding FIRST, feature SECOND; 2H -> H, no activation
    g = DecoderLayer0(h)               # one Llama layer WITHOUT input norm
    logits = target.lm_head(g)         # no final norm; the target's frozen head

The pair (f_t, x_{t+1}) sits at RoPE position t, and g_t is trained to be ≈ f_{t+1}. The head owns no lm_head:
callers apply the target's, so a draft costs one layer plus one vocabulary projection per step.
"""

from __future__ import annotations

import torch
from torch import nn

from hass_deploy.models.target import DecoderLayer, KVStore, ModelConfig, ReadOnlyKV, Rotary, run_layers


class DraftHead(nn.Module):
    """Parameter names are EAGLE's flat checkpoint keys (`fc.weight`, `layers.0.*`, `embed_tokens.weight`)."""

    def __init__(self, config: ModelConfig, fc_bias: bool = False):
        super().__init__()
        if config.num_layers != 1:
            raise ValueError(f"an EAGLE/HASS draft head has exactly one layer, not {config.num_layers}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # a frozen copy of the target's
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=fc_bias)
        self.layers = nn.ModuleList([DecoderLayer(config, 0, input_norm=False)])
        self.rotary = Rotary(config)

    @property
    def fc_bias(self) -> bool:
        return self.fc.bias is not None

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
