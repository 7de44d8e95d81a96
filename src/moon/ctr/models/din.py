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
    revision = 2  # 2: reads the user's own past actions on the target

    def build(self, data, tables: dict) -> None:
        super().build(data, tables)
        self.uses_behaviour = self.spec.get("behaviour_items") is not None
        self.uses_actions = self.uses_behaviour and self.spec.get("behaviour_actions") is not None
        if self.uses_behaviour:
            dim = self.embeddings.item_width
            extra = self.config.embedding_dim if self.uses_actions else 0
            self.attention = TargetAttention(dim, self.config.attention_hidden, extra)

    def width(self) -> int:
        return super().width() + (self.embeddings.item_width if self.uses_behaviour else 0) \
            + (self.config.embedding_dim if self.uses_actions else 0)

    def blocks(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        parts = super().blocks(batch)
        if self.uses_behaviour:
            keys = self.embeddings.items(batch["behaviour_rows"])
            target = parts[0]  # DNN's first block: the target's item fields
            parts.append(self.id_interest(target, keys, batch["behaviour_actions"], batch["behaviour_mask"]))
        if self.uses_actions:
            parts.append(self.own_actions(batch))
        return parts

    def own_actions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The user's strongest past action on the target item itself (none, click, cart,
        purchase; `CtrData`'s `own_action`, read from the whole history), embedded. Attention over
        small ID embeddings hardly tells an exact repeat from a similar item, and a repeat is the
        strongest sign of fit there is: without this, CUBE over random vectors (whose only match
        is the item itself) beat DIN by as much as CUBE over learned ones."""
        return self.embeddings("behaviour_actions", batch["own_action"])

    def id_interest(self, target: torch.Tensor, keys: torch.Tensor, actions: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """The ID interest: target attention of the target's embedded item fields over the
        behaviours' (`keys`)."""
        extra = self.embeddings("behaviour_actions", actions) if self.uses_actions else None
        return self.attention(target, keys, mask.float(), extra)
