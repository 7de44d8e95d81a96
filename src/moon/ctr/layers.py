"""Layers the CTR models share: feature embeddings, the predictor MLP, DIN's target attention,
frozen representation tables, CUBE's content interest and its top-K pre-selection."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from moon.config import CubeBranches
from moon.ctr.data import CtrData
from moon.ctr.features import FeatureSpec
from moon.ctr.representations import RepresentationTable

ITEM_FIELDS = ("item_id", "shop_id", "leaf")  # categorical item columns, looked up by catalogue row


def mlp(widths: list[int], out: int | None = None) -> nn.Sequential:
    """Linear + ReLU per hidden width, then an optional bare Linear to `out`."""
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(widths):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    if out is not None:
        layers.append(nn.Linear(widths[-1], out))
    return nn.Sequential(*layers)


def lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Rows of an embedding table for codes of any shape. `index_select` rather than
    `nn.Embedding`'s own lookup: on CPU its backward (an index_add) is 3-4x faster than the
    embedding backward's sort. The padding row 0 starts at zero and stays there: every reader
    masks padded positions, so no gradient reaches it."""
    return table.index_select(0, codes.reshape(-1)).view(*codes.shape, table.shape[1])


class FeatureEmbeddings(nn.Module):
    """One learned table per embedded feature of the sources a model reads (a feature sharing
    another's table uses that one), and the catalogue's item codes by row, so any item row
    becomes its embedded fields."""

    def __init__(self, spec: FeatureSpec, data: CtrData, dim: int, sources: tuple[str, ...]):
        super().__init__()
        sizes = data.vocab_sizes()
        self.dim = dim
        self.spec = spec
        names = {spec.embedded_as(f) for f in spec.features
                 if f.type in ("categorical", "sequence") and f.source in sources}
        self.tables = nn.ModuleDict({name: nn.Embedding(sizes[name], dim, padding_idx=0) for name in sorted(names)})
        self.item_fields = [name for name in ITEM_FIELDS if spec.get(name) is not None]
        for name in self.item_fields:
            self.register_buffer(f"item_{name}", torch.from_numpy(data.items[name]), persistent=False)
        self.register_buffer("item_price", torch.from_numpy(data.items["price"]), persistent=False)

    def __call__(self, name: str, codes: torch.Tensor) -> torch.Tensor:
        return lookup(self.tables[name].weight, codes)

    @property
    def item_width(self) -> int:
        return self.dim * len(self.item_fields)

    def items(self, rows: torch.Tensor) -> torch.Tensor:
        """The item fields of catalogue rows (any shape), concatenated on a last axis."""
        return torch.cat([lookup(self.tables[name].weight, getattr(self, f"item_{name}")[rows])
                          for name in self.item_fields], -1)

    def price(self, rows: torch.Tensor) -> torch.Tensor:
        return self.item_price[rows]


class TargetAttention(nn.Module):
    """DIN's activation unit: a small MLP scores each behaviour against the target from
    [target, behaviour, target - behaviour, target * behaviour, extra]; the scores weight a mean
    of the behaviours (no softmax, so the weights keep their intensity, as in DIN; a mean, so
    the pooled vector does not grow with the sequence length), padding masked out.

    The MLP's first layer is linear in each part, so it is applied part by part: the target's
    share once per sample, the others per behaviour, without building the concatenation
    (the same function as the concatenated form, for half its multiply-adds and no copy)."""

    def __init__(self, dim: int, hidden: list[int], extra: int = 0):
        super().__init__()
        self.dim, self.extra = dim, extra
        self.first = nn.Linear(4 * dim + extra, hidden[0])
        self.rest = nn.Sequential(nn.ReLU(), mlp(hidden, out=1))

    def forward(self, target: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        d = self.dim
        w_target, w_key, w_difference, w_product, w_extra = self.first.weight.split([d, d, d, d, self.extra], dim=1)
        hidden = (target @ (w_target + w_difference).T + self.first.bias).unsqueeze(1)
        hidden = hidden + keys @ (w_key - w_difference).T + (target.unsqueeze(1) * keys) @ w_product.T
        if extra is not None:
            hidden = hidden + extra @ w_extra.T
        weights = self.rest(hidden).squeeze(-1) * mask
        return (weights.unsqueeze(-1) * keys).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


class FrozenRepresentations(nn.Module):
    """A representation table as non-trainable, non-persistent buffers: float16 vectors by row
    (row 0 and rows the version lacks are zero) and a flag saying which rows it holds. Checkpoints
    name the version instead of carrying the table; loading another version is `swap`."""

    def __init__(self, table: RepresentationTable):
        super().__init__()
        self.register_buffer("vectors", table.vectors, persistent=False)
        self.register_buffer("present", table.present, persistent=False)
        self.version, self.dim = table.version, table.dim

    def swap(self, table: RepresentationTable) -> None:
        if table.vectors.shape != self.vectors.shape:
            raise ValueError(f"version {table.version} has {tuple(table.vectors.shape)} rows x dims, "
                             f"the model was built for {tuple(self.vectors.shape)}")
        self.vectors, self.present, self.version = table.vectors.to(self.vectors.device), table.present, table.version

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(rows, self.vectors).float()  # a row lookup: twice as fast as indexing


class ContentInterest(nn.Module):
    """CUBE's reading of one behaviour sequence against the target, in representation space.

    s_b = cos(target, behaviour_b) (vectors are unit length or zero, so a dot product). The
    behaviours are pooled with weights from s_b: the paper's raw s_b, averaged (`pooling:
    cosine`), or a masked softmax of s_b / tau with a learned temperature tau (`pooling:
    softmax`), which can single out the behaviours closest to the target however alike a
    version's cosines are.
    What it returns, each part switchable (`ctr.cube`):
    - content: the pooled representation, projected to the ID width, with the mean and the
      largest s_b;
    - histogram (SimTier): the share of behaviours in each band of s_b, bands at the deciles of
      the training samples' cosines (fitted once, kept in the checkpoint);
    - fusion: the behaviours' ID embeddings pooled with the same weights.
    """

    def __init__(self, rep_dim: int, dim: int, branches: CubeBranches, id_dim: int | None, bands: int = 10):
        super().__init__()
        self.branches, self.id_dim = branches, id_dim
        self.project = nn.Linear(rep_dim, dim)
        if branches.pooling == "softmax":
            self.log_temperature = nn.Parameter(torch.tensor(-2.3))  # tau = 0.1 at the start
        self.register_buffer("edges", torch.linspace(-1, 1, bands + 1)[1:-1])  # until `fit_bands`
        self.dim = dim

    @property
    def width(self) -> int:
        branches = self.branches
        return (self.dim + 2 if branches.content else 0) + (len(self.edges) + 1 if branches.histogram else 0) \
            + (self.id_dim or 0)

    def fit_bands(self, target: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor) -> None:
        """Band edges at the deciles of the cosines of a sample of (target, behaviour) pairs."""
        scores = torch.einsum("bd,bld->bl", target, behaviour)[mask]
        if len(scores) >= len(self.edges) + 1:
            levels = torch.linspace(0, 1, len(self.edges) + 2)[1:-1]
            self.edges = torch.quantile(scores.float(), levels).contiguous()

    def forward(self, target: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor,
                ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        branches = self.branches
        scores = torch.einsum("bd,bld->bl", target, behaviour)
        valid = mask.float()
        count = valid.sum(1, keepdim=True).clamp(min=1)
        if branches.pooling == "softmax":
            logits = (scores / self.log_temperature.exp()).masked_fill(~mask, -1e4)
            weights = torch.softmax(logits, 1) * valid  # an empty sequence pools to zero
        else:
            weights = scores * valid / count
        parts = []
        if branches.content:
            content = self.project(torch.einsum("bl,bld->bd", weights, behaviour))
            largest = scores.masked_fill(~mask, -1.0).max(1, keepdim=True).values * mask.any(1, keepdim=True)
            parts += [content, (scores * valid).sum(1, keepdim=True) / count, largest]
        if branches.histogram:
            bands = torch.bucketize(scores, self.edges)
            shares = torch.zeros(*scores.shape[:1], len(self.edges) + 1, device=scores.device)
            parts.append(shares.scatter_add_(1, bands, valid) / count)
        if ids is not None:
            parts.append(torch.einsum("bl,bld->bd", weights, ids))
        return parts


def most_similar(scores: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the k valid behaviours most similar to the target (top-K pre-selection),
    kept in time order, and their mask."""
    k = min(k, scores.shape[1])
    ranked = scores.masked_fill(~mask, float("-inf")).topk(k, dim=1).indices.sort(dim=1).values
    return ranked, mask.gather(1, ranked)
