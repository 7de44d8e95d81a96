"""DIN: the DNN plus target attention over the user's behaviour (Zhou et al., KDD 2018).

Each behaviour is its item's embedded fields (the same tables as the target's), its action
(click, cart, purchase) entering the attention scores; the target's fields are the query of
the attention. Only IDs: no content.
"""

from __future__ import annotations

import torch

from moon.ctr.layers import TargetAttention
from moon.ctr.models.dnn import DNN


class DIN(DNN):
    sources = (*DNN.sources, "behaviour")

    def build(self, tables: dict) -> None:
        super().build(tables)
        self.uses_behaviour = self.spec.get("behaviour_items") is not None
        self.uses_actions = self.spec.get("behaviour_actions") is not None
        if self.uses_behaviour:
            dim = self.embeddings.item_width
            extra = self.config.embedding_dim if self.uses_actions else 0
            self.attention = TargetAttention(dim, self.config.attention_hidden, extra)

    def width(self) -> int:
        return super().width() + (self.embeddings.item_width if self.uses_behaviour else 0)

    def behaviour(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(item rows, action codes, mask) of the behaviour the attention reads."""
        return batch["behaviour_rows"], batch["behaviour_actions"], batch["behaviour_mask"]

    def blocks(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        parts = super().blocks(batch)
        if self.uses_behaviour:
            rows, actions, mask = self.behaviour(batch)
            parts += self.behaviour_blocks(batch, rows, self.embeddings.items(rows), actions, mask)
        return parts

    def behaviour_blocks(self, batch: dict[str, torch.Tensor], rows: torch.Tensor, keys: torch.Tensor,
                         actions: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """What the model reads from the behaviour: here the ID interest (target attention)."""
        extra = self.embeddings("behaviour_actions", actions) if self.uses_actions else None
        target = self.embeddings.items(batch["item_row"])
        return [self.attention(target, keys, mask.float(), extra)]
