"""The ID-only DNN: every categorical feature embedded, numeric features as they are, an MLP.

A model is a list of feature blocks concatenated into the predictor; DIN and CUBE add blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from moon.config import CtrConfig
from moon.ctr.data import CtrData
from moon.ctr.features import FeatureSpec
from moon.ctr.layers import FeatureEmbeddings, mlp


class DNN(nn.Module):
    representations: tuple[str, ...] = ()  # representation features the model reads
    sources: tuple[str, ...] = ("sample", "item")  # feature sources whose IDs it embeds
    revision = 1  # raised whenever what the model computes changes: runs trained before are then not reused

    def __init__(self, spec: FeatureSpec, data: CtrData, config: CtrConfig, tables: dict | None = None):
        super().__init__()
        self.spec, self.config = spec, config
        self.embeddings = FeatureEmbeddings(spec, data, config.embedding_dim, self.sources)
        self.build(data, tables or {})
        self.predictor = mlp([self.width(), *config.hidden], out=1)

    def build(self, data: CtrData, tables: dict) -> None:
        """Sub-modules of the blocks a model adds (DIN, CUBE)."""

    def width(self) -> int:
        sample = sum(1 for f in self.spec.features if f.type == "categorical" and f.source == "sample")
        numeric = len(self.spec.of_type("numeric"))
        return self.embeddings.item_width + self.config.embedding_dim * sample + numeric

    def blocks(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        parts = [self.embeddings.items(batch["item_row"])]
        codes = {"user_id": batch["user"], "query_kind": batch["query_kind"]}
        for feature in self.spec.features:
            if feature.type == "categorical" and feature.source == "sample":
                parts.append(self.embeddings(feature.name, codes[feature.name]))
        numbers = {"price": self.embeddings.price(batch["item_row"]), "position": torch.log1p(batch["position"])}
        parts += [numbers[feature.name].unsqueeze(-1) for feature in self.spec.of_type("numeric")]
        return parts

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The click logit of each sample."""
        return self.predictor(torch.cat(self.blocks(batch), -1)).squeeze(-1)
