"""The CTR feature spec: a YAML list of features, each a name, a type and a source.

The embedded `configs/ctr/features.yaml` documents the format. A spec says *what* the features are;
each model takes the kinds it uses: the ID-only DNN every categorical and numeric feature,
DIN also the behaviour sequences, CUBE also the representations. Leaving a feature out of
the spec leaves it out of every model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moon.config import MoonConfig, describe_errors
from moon.errors import UserError

DEFAULT_SPEC = "ctr/features.yaml"  # feature specs sit apart from the run configs in configs/
# Columns a spec can name, by source (catalogue columns are derived from the items table).
COLUMNS = {
    "sample": ("user_id", "position", "query_kind"),
    "item": ("item_id", "shop_id", "leaf", "price"),
    "behaviour": ("behaviour_items", "behaviour_actions"),
    "queries": ("past_queries",),
}
REPRESENTED = ("item_id", "query_id")


class Feature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["categorical", "numeric", "sequence", "representation"]
    source: Literal["sample", "item", "behaviour", "queries"] | None = None
    normalizer: Literal["log1p"] | None = None
    share_embedding: str | None = None
    min_count: int = Field(1, ge=1)
    of: Literal["item_id", "query_id"] | None = None
    version: str | None = None
    dim: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Feature:
        if self.type == "representation":
            if self.of is None:
                raise ValueError(f"representation {self.name!r} needs `of: item_id` or `of: query_id`")
            return self
        if self.source is None or self.name not in COLUMNS[self.source]:
            known = "; ".join(f"{source}: {', '.join(names)}" for source, names in COLUMNS.items())
            raise ValueError(f"{self.name!r} with source {self.source!r} is not a known column ({known})")
        if (self.type == "sequence") != (self.source in ("behaviour", "queries")):
            raise ValueError(f"{self.name!r}: sequences come from behaviour or queries, and only sequences do")
        return self


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: list[Feature]

    @model_validator(mode="after")
    def _valid(self) -> FeatureSpec:
        names = [feature.name for feature in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        categorical = {f.name for f in self.features if f.type == "categorical"}
        for feature in self.features:
            if feature.share_embedding and feature.share_embedding not in categorical:
                raise ValueError(f"{feature.name!r} shares the embedding of {feature.share_embedding!r}, "
                                 "which is not a categorical feature of the spec")
        if "item_id" not in categorical:
            raise ValueError("the spec needs the target item: {name: item_id, type: categorical, source: item}")
        return self

    def of_type(self, kind: str) -> list[Feature]:
        return [feature for feature in self.features if feature.type == kind]

    def get(self, name: str) -> Feature | None:
        return next((feature for feature in self.features if feature.name == name), None)

    def representation(self, of: str) -> Feature | None:
        """The representation feature of item_id or query_id, if the spec has one."""
        return next((f for f in self.of_type("representation") if f.of == of), None)

    def embedded_as(self, feature: Feature) -> str:
        """The name of the embedding table a feature looks up (its own unless shared)."""
        return feature.share_embedding or feature.name


def load_spec(config: MoonConfig, version: str | None = None) -> FeatureSpec:
    """The spec `ctr.features` names (default: the embedded one), with `version` (one of
    `ctr.representations`) and `ctr.dim`, when set, applied to every representation feature."""
    path = Path(config.ctr.features) if config.ctr.features else resources.files("moon.configs") / DEFAULT_SPEC
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"ctr.features={config.ctr.features}: no such file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    try:
        spec = FeatureSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"feature spec {path}: {describe_errors(exc)}") from None
    for feature in spec.of_type("representation"):
        feature.version = version or feature.version
        feature.dim = config.ctr.dim or feature.dim
    return spec
