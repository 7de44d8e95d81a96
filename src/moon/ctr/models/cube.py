"""CUBE, the content-based user behaviour extractor (MOON, arXiv 2511.11305, Fig. 5).

DIN plus, over frozen multimodal representations r (unit vectors from a store version):
- content interest: the behaviours' representations pooled with weights from their cosines
  to the target, s_b = cos(r_target, r_b) (`layers.ContentInterest`: the paper's raw s_b
  averaged, or with `ctr.cube.pooling=softmax` a softmax with a learned temperature), with
  the mean and largest s_b, and the share of behaviours per band of s_b (SimTier's
  histogram: which of them the target resembles, however alike a version's cosines are);
- fusion interest (`ctr.cube.fusion`): the behaviours' ID embeddings pooled with the same weights;
- the target-query similarity cos(r_target, r_query) as one more feature;
- the same reading of the user's past queries (`ctr.cube.query_sequence`: their
  representations and query ID embeddings), the query behaviour sequence;
- the target's and the query's representations themselves, and a flag saying whether the
  target has one (an item the version lacks has a zero vector).
Every representation-sized vector passes a trainable projection of its own to the ID
embeddings' width (frozen vectors, learned read-outs, as FuxiCTR does with pretrained
embeddings), so the predictor's input does not grow with the version's dim. Each part is
switchable (`ctr.cube.*`); the defaults are those the ablation study kept. With
`ctr.top_k`, only the K behaviours most similar to the target reach DIN's attention and the
content interest (SIM-style hard search), so a long sequence costs one cosine per behaviour
and the rest grows with K.
"""

from __future__ import annotations

import torch

from moon.ctr.layers import ContentInterest, FrozenRepresentations, most_similar
from moon.ctr.models.din import DIN
from moon.ctr.models.dnn import DNN

BAND_SAMPLES = 4096  # training samples whose cosines place the histogram's bands


class CUBE(DIN):
    representations = ("item_id", "query_id")
    sources = (*DIN.sources, "queries")
    revision = 2  # 2: ContentInterest (histogram, pooling choice), distinct items, own actions

    def build(self, data, tables: dict) -> None:
        super().build(data, tables)
        if "item_id" not in tables:
            raise ValueError("CUBE needs the item representation feature (a `representation` feature of item_id)")
        self.items_mm = FrozenRepresentations(tables["item_id"])
        self.queries_mm = FrozenRepresentations(tables["query_id"]) if "query_id" in tables else None
        branches, dim = self.config.cube, self.config.embedding_dim
        self.query_sequence = branches.query_sequence and self.queries_mm is not None \
            and self.spec.get("past_queries") is not None
        self.target_projection = torch.nn.Linear(self.items_mm.dim, dim)
        if self.queries_mm is not None:
            self.query_projection = torch.nn.Linear(self.queries_mm.dim, dim)
        if self.uses_behaviour:
            self.item_interest = ContentInterest(self.items_mm.dim, dim, branches,
                                                 self.embeddings.item_width if branches.fusion else None)
        if self.query_sequence:
            self.query_interest = ContentInterest(self.queries_mm.dim, dim, branches, dim if branches.fusion else None)
        if branches.histogram:
            self.fit_bands(data)

    @torch.no_grad()
    def fit_bands(self, data) -> None:
        """The histogram's bands from the first training samples' cosines to their behaviours."""
        ctr = self.config
        batch = data.batch(data.splits["train"][:BAND_SAMPLES], ctr.max_len, ctr.query_max_len, ctr.distinct_items)
        target = self.items_mm(batch["item_row"])
        if self.uses_behaviour:
            rows, _, mask = self.behaviour(batch, target)
            self.item_interest.fit_bands(target, self.items_mm(rows), mask)
        if self.query_sequence:
            self.query_interest.fit_bands(target, self.queries_mm(batch["past_query_rows"]), batch["past_query_mask"])

    def width(self) -> int:
        width = super().width() + self.config.embedding_dim + 1  # the target's representation and its "present" flag
        if self.uses_behaviour:
            width += self.item_interest.width
        if self.queries_mm is not None:
            width += self.config.embedding_dim + (1 if self.config.cube.query_similarity else 0)
        if self.query_sequence:
            width += self.query_interest.width
        return width

    def behaviour(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(item rows, action codes, mask) of the behaviours read: the K most similar to the target
        with `ctr.top_k` (no gradient flows through the choice)."""
        rows, actions, mask = batch["behaviour_rows"], batch["behaviour_actions"], batch["behaviour_mask"]
        if self.config.top_k and rows.shape[1] > self.config.top_k:
            with torch.no_grad():
                scores = torch.einsum("bd,bld->bl", target, self.items_mm(rows))
            keep, mask = most_similar(scores, mask, self.config.top_k)
            rows, actions = rows.gather(1, keep), actions.gather(1, keep)
        return rows, actions, mask

    def blocks(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        parts = DNN.blocks(self, batch)  # DIN's parts come below, its ID interest over the chosen behaviours
        branches = self.config.cube
        target = self.items_mm(batch["item_row"])
        parts += [self.target_projection(target), self.items_mm.present[batch["item_row"]].float().unsqueeze(-1)]
        if self.uses_actions:
            parts.append(self.own_actions(batch))
        if self.uses_behaviour:
            rows, actions, mask = self.behaviour(batch, target)
            keys = self.embeddings.items(rows)
            parts.append(self.id_interest(parts[0], keys, actions, mask))  # parts[0]: the target's item fields
            parts += self.item_interest(target, self.items_mm(rows), mask, keys if branches.fusion else None)
        if self.queries_mm is not None:
            query = self.queries_mm(batch["query_row"])
            parts.append(self.query_projection(query))
            if branches.query_similarity:
                parts.append((target * query).sum(-1, keepdim=True))
        if self.query_sequence:
            ids = self.embeddings("past_queries", batch["past_query_codes"]) if branches.fusion else None
            parts += self.query_interest(target, self.queries_mm(batch["past_query_rows"]), batch["past_query_mask"], ids)
        return parts
