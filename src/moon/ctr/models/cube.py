"""CUBE, the content-based user behaviour extractor (MOON, arXiv 2511.11305, Fig. 5).

DIN plus, over frozen multimodal representations r (unit vectors from a store version):
- content interest: s_b = cos(r_target, r_b) for each behaviour item b, and sum_b s_b r_b;
- fusion interest: the behaviour ID embeddings pooled with the same weights, sum_b s_b e_b;
- the target-query similarity cos(r_target, r_query) as one more feature;
- the same pooling over the user's past queries (their representations and query ID
  embeddings), the query behaviour sequence;
- the target's and the query's representations themselves, and a flag saying whether the
  target has one (an item the version lacks has a zero vector);
- with the content branch, the mean and the largest s_b of each sequence: how close the
  target is to what the user did, as plain numbers (what SimTier's histogram of cosines
  carries in coarser form).
Every representation-sized vector passes one trainable projection to the ID embeddings' width
(frozen vectors, a learned read-out, as FuxiCTR does with pretrained embeddings), so the
predictor's input does not grow with the version's dim. No attention runs in the
representation space. Each branch is switchable (`ctr.cube.*`), and
`ctr.top_k` keeps only the K behaviours most similar to the target, for long sequences.
"""

from __future__ import annotations

import torch

from moon.ctr.layers import FrozenRepresentations, most_similar, similarity_pooling
from moon.ctr.models.din import DIN


class CUBE(DIN):
    representations = ("item_id", "query_id")
    sources = (*DIN.sources, "queries")

    def build(self, tables: dict) -> None:
        super().build(tables)
        if "item_id" not in tables:
            raise ValueError("CUBE needs the item representation feature (a `representation` feature of item_id)")
        self.items_mm = FrozenRepresentations(tables["item_id"])
        self.queries_mm = FrozenRepresentations(tables["query_id"]) if "query_id" in tables else None
        self.project = torch.nn.Linear(self.items_mm.dim, self.config.embedding_dim)
        branches = self.config.cube
        self.query_sequence = branches.query_sequence and self.queries_mm is not None \
            and self.spec.get("past_queries") is not None

    def width(self) -> int:
        branches, dim = self.config.cube, self.config.embedding_dim
        content = dim + 2  # the pooled representation, projected, and the mean and largest cosine
        width = super().width() + dim + 1  # the target's representation and its "present" flag
        if self.uses_behaviour:
            width += (content if branches.content else 0) + (self.embeddings.item_width if branches.fusion else 0)
        if self.queries_mm is not None:
            width += dim + (1 if branches.query_similarity else 0)
        if self.query_sequence:
            width += (content if branches.content else 0) + (dim if branches.fusion else 0)
        return width

    def behaviour(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, actions, mask = super().behaviour(batch)
        if self.config.top_k and rows.shape[1] > self.config.top_k:
            target = self.items_mm(batch["item_row"])
            scores = torch.einsum("bd,bld->bl", target, self.items_mm(rows))
            keep, mask = most_similar(scores, mask, self.config.top_k)
            rows, actions = rows.gather(1, keep), actions.gather(1, keep)
        return rows, actions, mask

    def behaviour_blocks(self, batch: dict[str, torch.Tensor], rows: torch.Tensor, keys: torch.Tensor,
                         actions: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """DIN's ID interest, then the content and fusion interest of the same behaviours."""
        parts = super().behaviour_blocks(batch, rows, keys, actions, mask)
        target = self.items_mm(batch["item_row"])
        return parts + self.interest(target, self.items_mm(rows), mask, keys if self.config.cube.fusion else None)

    def blocks(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        parts = super().blocks(batch)
        branches = self.config.cube
        target = self.items_mm(batch["item_row"])
        parts += [self.project(target), self.items_mm.present[batch["item_row"]].float().unsqueeze(-1)]
        if self.queries_mm is not None:
            query = self.queries_mm(batch["query_row"])
            parts.append(self.project(query))
            if branches.query_similarity:
                parts.append((target * query).sum(-1, keepdim=True))
        if self.query_sequence:
            ids = self.embeddings("past_queries", batch["past_query_codes"]) if branches.fusion else None
            parts += self.interest(target, self.queries_mm(batch["past_query_rows"]), batch["past_query_mask"], ids)
        return parts

    def interest(self, target: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor,
                 ids: torch.Tensor | None) -> list[torch.Tensor]:
        """Content interest (projected, with the mean and largest cosine) and fusion interest of one sequence."""
        branches = self.config.cube
        content, fusion, scores = similarity_pooling(target, behaviour, mask.float(), ids)
        parts = []
        if branches.content:
            count = mask.sum(1, keepdim=True).clamp(min=1)
            largest = scores.masked_fill(~mask, -1.0).max(1, keepdim=True).values.clamp(min=-1.0) * mask.any(1, keepdim=True)
            parts += [self.project(content), scores.sum(1, keepdim=True) / count, largest]
        if branches.fusion:
            parts.append(fusion)
        return parts
