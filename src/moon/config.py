"""The typed run configuration: one model per stage, loaded from YAML, with `section.key=value` overrides.

Every field has a default and a one-line description (`moon config show` prints both).
Unknown keys and wrong types are refused with a message naming the key and what is allowed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moon.errors import UserError
from moon.io.schema import ITEM_VIEWS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# Marks a field that says how a stage runs (processes, workers), never what it makes: it is left
# out of the config digest, so changing it neither invalidates outputs nor blocks a resume.
HOW_NOT_WHAT = {"digest": False}


class WorldConfig(Section):
    """The simulated catalogue: categories, brands, shops, SPUs with SKU variants, drawn images."""

    items: int = Field(2000, gt=0, description="number of items (SKUs) in the catalogue")
    leaf_categories: int = Field(60, ge=3, description="leaf categories of the 3-level category tree")
    brands: int = Field(80, gt=0, description="number of brands")
    shops: int = Field(40, gt=0, description="number of shops; each sells a few brands")
    variants_per_spu: float = Field(
        1.8, ge=1.0, description="mean number of SKUs (colour/size variants) per SPU"
    )
    new_item_share: float = Field(
        0.15, ge=0.0, lt=1.0, description="share of items launched during the simulated period (cold start)"
    )
    title_noise: float = Field(
        0.3, ge=0.0, le=1.0, description="strength of title noise: synonyms, marketing words, dropped attributes"
    )
    image_size: int = Field(96, ge=32, le=1024, description="side in pixels of drawn catalogue images")
    chunk_items: int = Field(1024, gt=0, description="items generated and written per streamed chunk")
    workers: int = Field(0, ge=0, description="processes drawing image chunks; 0: one per CPU core",
                         json_schema_extra=HOW_NOT_WHAT)


class BehaviourConfig(Section):
    """Simulated users and search sessions over the catalogue, and the click model."""

    catalog: str | None = Field(
        None, description="run directory with ingested items to simulate behaviour over (else the drawn world)"
    )
    users: int = Field(300, gt=0, description="number of users")
    regions: int = Field(6, gt=0, le=26, description="number of regions users live in")
    days: int = Field(14, gt=0, description="simulated days of search sessions")
    start_date: dt.date = Field(dt.date(2026, 1, 1), description="first simulated day (UTC)")
    sessions_per_user_day: float = Field(1.0, gt=0, description="mean search sessions per user per day")
    image_query_share: float = Field(
        0.3, ge=0.0, le=1.0, description="share of sessions that search with a user photo instead of text"
    )
    results_per_query: int = Field(10, ge=2, le=100, description="impressions shown per query")
    position_decay: float = Field(
        0.8, gt=0.0, le=1.0, description="chance of examining rank p is position_decay**(p-1)"
    )
    relevance_weight: float = Field(3.0, ge=0.0, description="click-model weight of query-item relevance")
    taste_weight: float = Field(
        3.0, ge=0.0, description="click-model weight of the user's taste (style, colour, brand, price, hidden facts); "
        "at 1.5 a shopper's last 20 behaviours were worth +0.002 test AUC, at 3 +0.013",
    )
    appeal_weight: float = Field(
        1.0, ge=0.0, description="click-model weight of an item's appeal (everyone's liking of it)"
    )
    appeal_visible_share: float = Field(
        0.5, ge=0.0, le=1.0, description="share of appeal's variance seen in the image (its finish); the rest is "
        "hidden, learnt only from the item's clicks",
    )
    activity_spread: float = Field(
        0.8, gt=0.0, description="log-normal sigma of users' activity: a long tail of shoppers with long histories"
    )
    click_bias: float = Field(-2.2, description="click-model intercept (logit)")
    cart_rate: float = Field(0.35, ge=0.0, le=1.0, description="base chance that a click leads to a cart")
    purchase_rate: float = Field(0.5, ge=0.0, le=1.0, description="base chance that a cart leads to a purchase")
    ranker_noise: float = Field(
        0.6, ge=0.0, description="noise of the search engine's ranking (higher: relevant items rank lower)"
    )
    new_item_boost: float = Field(
        0.3, ge=0.0, description="ranking boost of items launched in the last 7 days (cold-start traffic); at 0.1 "
        "the demo's 3 test days showed items never shown before only 688 times",
    )
    photo_size: int = Field(96, ge=32, le=1024, description="side in pixels of user photos (image queries)")


class ColumnMap(Section):
    """Where each items column comes from in a user's file."""

    item_id: str = Field("item_id", description="column with the unique item id")
    title: str = Field("title", description="column with the product title")
    category: list[str] = Field(
        ["category"], description="one list column, or several columns from root to leaf category"
    )
    attributes: dict[str, str] = Field({}, description="attribute name -> column holding its value")
    image: str = Field("image", description="column with image bytes, or a file name under image_dir")
    spu_id: str | None = Field(None, description="column with the SPU id (default: each item its own SPU)")
    shop_id: str | None = Field(None, description="column with the shop id")
    price: str | None = Field(None, description="column with the price")
    created_at: str | None = Field(None, description="column with the listing time")


class IngestConfig(Section):
    """Real catalogues into the items table (`moon ingest SOURCE`)."""

    format: Literal["auto", "kaggle", "parquet", "csv", "jsonl"] = Field(
        "auto", description="source layout; auto detects it from the path"
    )
    columns: ColumnMap | None = Field(
        None, description="column mapping; null detects a known layout (MOON, Kaggle fashion, fashion parquet)"
    )
    image_dir: str | None = Field(
        None, description="folder of image files, relative to the source (kaggle: images)"
    )
    image_file: str = Field(
        "{item_id}.jpg", description="image file name when the image column is absent, from {item_id}"
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="images with more pixels are rejected as likely decompression bombs"
    )
    spu_from_title: bool = Field(
        False, description="group items with the same normalised title into one SPU"
    )
    shard_rows: int = Field(8192, gt=0, description="rows per output Parquet shard")
    max_query_image_bytes: int = Field(
        5_000_000, gt=0, description="behaviour logs: query photos with more bytes are rejected as too large"
    )
    labelled_test_share: float = Field(
        0.2, ge=0.0, le=1.0, description="moon ingest-queries: share of labelled queries without a split of their "
        "own that become test queries, chosen by a hash of the query (a query keeps its split on every re-ingest)",
    )


# MOON's published stage-1 mix, in billions of pairs; only the proportions matter here.
PUBLISHED_MIX = {
    "text->richer-text": 0.2,
    "text->image": 0.2,
    "text->title+image": 0.2,
    "text->richer-text+image": 0.5,
    "image->image": 0.2,
    "image->title+image": 0.5,
    "image->richer-text+image": 0.2,
    "title+image->title+image": 0.5,
    "richer-text+image->richer-text+image": 0.1,
}


class PairsConfig(Section):
    """Behaviour log -> stage-1 and stage-2 post-training pairs and the image-search evaluation set."""

    mix: dict[str, float] = Field(
        dict(PUBLISHED_MIX), description="stage-1 task -> share of pairs (MOON's published mix by default)"
    )
    action_weights: dict[str, float] = Field(
        {"click": 1.0, "cart": 2.0, "purchase": 3.0}, description="pair weight by the strongest action taken"
    )
    valid_days: int = Field(2, ge=0, description="days before the test days whose pairs form the valid split")
    test_days: int = Field(3, ge=1, description="last days of the log: the test split and the evaluation set")
    dedup_similarity: bool = Field(True, description="stage 2: per item keep only its hardest (least similar) query")
    spu_merge: bool = Field(True, description="stage 2: one pair per query and SPU; sibling SKUs are positives")
    category_alignment: bool = Field(
        True, description="stage 2: down-sample leaf categories over-represented against impressions"
    )
    ner_filter: bool = Field(True, description="stage 2: drop pairs whose query text or item title has few entities")
    min_entities: int = Field(2, ge=0, description="entities a query text and an item title need to pass NER")
    hard_negatives: int = Field(4, ge=0, description="stage 2: same-leaf, other-SPU negatives per pair")
    mined_negatives: int = Field(4, ge=0, description="stage 2: embedder top-k neighbours used as negatives")
    embedder: str = Field(
        "baseline", description="similarity model for dedup and mining: baseline, or a checkpoint directory"
    )
    phash_distance: int = Field(4, ge=0, le=16, description="images within this perceptual-hash distance are duplicates")
    title_similarity: float = Field(
        0.9, gt=0.0, le=1.0, description="titles with at least this MinHash Jaccard similarity are duplicates"
    )
    batch_rows: int = Field(200_000, gt=0, description="event rows read per streamed batch")
    labelled_weight: float = Field(
        3.0, ge=0.0, description="weight of a pair from a labelled query set's train split (a judged "
        "match counts as a purchase by default); 0 leaves them out",
    )
    labelled_item_view: Literal["image", "title+image", "richer-text+image"] = Field(
        "richer-text+image", description="the item view of labelled pairs (tasks text-><view> and "
        "image-><view>); the view models serve by default",
    )

    @field_validator("mix")
    @classmethod
    def _known_tasks(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(mix) - set(PUBLISHED_MIX))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the tasks are {', '.join(PUBLISHED_MIX)}")
        mix = {**PUBLISHED_MIX, **mix}  # a task left out keeps its published share
        if any(share < 0 for share in mix.values()) or not any(share > 0 for share in mix.values()):
            raise ValueError("shares must be >= 0 and at least one task needs a positive share")
        return mix


class ModelConfig(Section):
    """The multimodal LLM backbone (Qwen2-VL family) and the embedding it yields."""

    checkpoint: str | None = Field(
        None, description="local Qwen2-VL / Qwen2.5-VL checkpoint directory; null builds the sizes below"
    )
    hidden_size: int = Field(128, gt=0, description="LLM hidden size (also the full embedding dimension)")
    layers: int = Field(2, gt=0, description="LLM transformer layers")
    heads: int = Field(4, gt=0, description="LLM attention heads")
    kv_heads: int = Field(2, gt=0, description="LLM key/value heads (grouped-query attention)")
    vision_depth: int = Field(2, gt=0, description="vision encoder blocks")
    vision_dim: int = Field(64, gt=0, description="vision encoder width")
    vision_heads: int = Field(4, gt=0, description="vision encoder attention heads")
    image_size: int = Field(64, gt=0, description="images are resized to this square side before patching")
    patch_size: int = Field(8, gt=0, description="vision patch side in pixels")
    vocab_size: int = Field(4096, ge=64, description="size of the tokenizer trained on the catalogue when none is given")
    max_text_tokens: int = Field(48, gt=0, description="text tokens kept per input")
    matryoshka_dims: list[int] = Field([32, 64, 128], description="embedding prefixes trained and served")
    bidirectional: bool = Field(True, description="embed with bidirectional attention (MOON); false: causal")
    served_view: Literal[ITEM_VIEWS] = Field(
        "richer-text+image", description="the item view a model's store versions, indexes and evaluation use"
    )
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="weights and compute dtype while training and embedding (bfloat16 on GPUs)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    lora_rank: int = Field(0, ge=0, description="train LoRA adapters of this rank on the LLM (peft); 0: full training")
    lora_targets: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], description="LLM modules LoRA adapts")


class TrainLoop(Section):
    """What every training stage shares: length, batch, optimiser, checkpoints and logging."""

    steps: int = Field(200, gt=0, description="optimiser steps")
    batch_size: int = Field(32, gt=0, description="examples per step on each process (rank)")
    chunk_size: int = Field(0, ge=0, description="GradCache / accumulation chunk; 0: the whole batch at once")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW), reached after warmup, then cosine decay")
    warmup_steps: int = Field(20, ge=0, description="linear learning-rate warmup steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    checkpoint_every: int = Field(100, gt=0, description="save a resumable checkpoint every this many steps")
    log_every: int = Field(10, gt=0, description="write a training-log line every this many steps")


class PretrainConfig(TrainLoop):
    """Domain-knowledge pretraining: next-token prediction on product tasks generated from the catalogue."""

    tasks: list[Literal["title", "attributes", "category", "subject"]] = Field(
        ["title", "attributes", "category", "subject"],
        description="image -> title, attribute question/answer, category path, main-subject description",
    )
    max_answer_tokens: int = Field(32, gt=0, description="answer tokens kept per example")


class PosttrainStage(TrainLoop):
    """One contrastive post-training stage over a pair table."""

    temperature: float = Field(0.05, gt=0, description="initial InfoNCE temperature of every task")
    learnable_temperature: bool = Field(True, description="learn one temperature per task (else keep it fixed)")
    symmetric: bool = Field(False, description="also train each positive to find its query among the batch's queries")
    task_weights: dict[str, float] = Field({}, description="loss weight by task; a task left out weighs 1")
    matryoshka_weights: list[float] | None = Field(
        None, description="loss weight per Matryoshka dim (model dims, then full); null: equal weights"
    )
    hard_negatives: float = Field(
        0, ge=0, description="hard negatives per pair, on average, drawn from the pair table and embedded without "
        "gradient (0.5: every other pair brings one); each costs an item forward pass",
    )
    spatial_negatives: bool = Field(
        True, description="true: each rank's loss is the whole global batch's, its queries gathered from every rank "
        "and the positives of every rank their in-batch negatives; false: each rank's loss is over its own pairs "
        "only, its queries against its own positives, the ranks' gradients averaged (the log shows rank 0's loss). "
        "Hard negatives and the queue are shared by all ranks either way; with one process both are the same",
    )
    queue_size: int = Field(0, ge=0, description="temporal negatives: item embeddings kept from past steps; 0: none")
    queue_max_age: int = Field(8, ge=0, description="temporal negatives older than this many steps are not used")
    augment_images: bool = Field(
        True, description="show image queries as a new random view every step (crop, rotation, colour, blur, JPEG)"
    )
    restage_images: bool = Field(
        True, description="paste most catalogue self-pair products, cut out of their plain background, onto "
        "shoppers' photos of the pairs (with augment_images)",
    )
    catalogue_pairs: float = Field(
        0.0, ge=0, lt=1, description="share of training pairs that are catalogue self-pairs: an augmented "
        "catalogue image as the query, its own item (richer-text+image) as the positive",
    )
    distill_weight: float = Field(
        0.0, ge=0, description="weight of the loss that teaches photos and items to name their catalogue image by "
        "the baseline's colour/texture descriptor (moon.train.distill); 0 for a pretrained checkpoint",
    )
    distill_temperature: float = Field(0.02, gt=0, description="softmax temperature of that loss")
    input_workers: int = Field(
        -1, ge=-1, description="processes preparing the next steps' inputs (augmentation, collation) while the "
        "model computes; 0: the training process prepares them itself; -1: one per CPU core the model leaves "
        "free, at most 8 (none when it trains on the CPU, whose cores its threads use). The data order does not "
        "depend on it", json_schema_extra=HOW_NOT_WHAT,
    )


class PosttrainConfig(Section):
    """Contrastive post-training: stage 1 on the mixed-modality pairs, stage 2 on cleaned purchases."""

    from_pretrained: bool = Field(True, description="start stage 1 from the pretraining checkpoint when there is one")
    stage1: PosttrainStage = Field(default_factory=PosttrainStage, description="stage 1: nine tasks, in-batch negatives")
    stage2: PosttrainStage = Field(
        default_factory=PosttrainStage, description="stage 2: purchases, hard and spatial-temporal negatives"
    )


class StoreConfig(Section):
    """The representation store: catalogue vectors in versioned, partitioned float16 shards (`moon embed`)."""

    partitions: int = Field(
        16, gt=0, description="shards a version's catalogue is split into: the unit of resume and of work per process"
    )
    batch_size: int = Field(
        256, gt=0, description="items embedded per forward pass (on 2 CPU cores the tiny model embeds fastest at "
        "256: about 10% more items/s than at 64 or 512)",
    )


class ServeConfig(Section):
    """The HTTP service (`moon serve`): what one request may ask for, and how embedding requests are batched."""

    max_body_bytes: int = Field(
        16 << 20, gt=0, description="largest request body in bytes; a larger one is refused (413) before it is read"
    )
    max_inputs: int = Field(
        32, gt=0, description="texts or images one /v1/embed request may hold, and items one /v1/admin/items request"
    )
    max_lookup_ids: int = Field(1000, gt=0, description="item ids one /v1/lookup request may ask for")
    max_image_bytes: int = Field(4 << 20, gt=0, description="largest image in bytes, after base64 decoding (413)")
    max_image_pixels: int = Field(
        25_000_000, gt=0, description="largest image in pixels (width x height), read from its header before it is "
        "decoded, so a decompression bomb is refused (413) without allocating its pixels",
    )
    max_text_chars: int = Field(2048, gt=0, description="longest text in characters (413)")
    max_k: int = Field(1000, gt=0, description="most results one search may ask for (k)")
    queue_size: int = Field(
        256, gt=0, description="inputs waiting to be embedded, all requests together; a request that would pass it "
        "is answered 429 at once",
    )
    batch_size: int = Field(32, gt=0, description="inputs the micro-batcher embeds in one forward pass")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="how long the micro-batcher waits for more requests to fill a batch, in milliseconds"
    )
    watch_interval: float = Field(
        10.0, gt=0, description="seconds between looks at the store for a newer version (`moon serve --watch`)"
    )

    @field_validator("queue_size")
    @classmethod
    def _room_for_a_request(cls, queue_size: int, info) -> int:
        largest = info.data.get("max_inputs")
        if largest is not None and queue_size < largest:
            raise ValueError(f"must be at least serve.max_inputs ({largest}), or a full request could never be queued")
        return queue_size


class EvalConfig(Section):
    """Offline retrieval metrics (`moon eval retrieval`, docs/metrics.md)."""

    ks: list[int] = Field([1, 10, 50, 100], description="the K of every recall@K")
    spu_hit: bool = Field(False, description="any SKU of the same SPU as a relevant item also counts as a hit")

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if not ks or min(ks) < 1:
            raise ValueError("give at least one K, each a positive integer, e.g. [1, 10, 50, 100]")
        return sorted(set(ks))


CTR_MODELS = ("dnn", "din", "cube")


class CubeBranches(Section):
    """CUBE's parts beside DIN's ID attention, each switchable for ablations. The defaults are
    what `moon study ablation` kept on the demo's valid days (README, "CUBE")."""

    content: bool = Field(True, description="content interest: behaviour representations pooled by their cosine to the target")
    histogram: bool = Field(True, description="SimTier: the share of the behaviours in each band of cosine to the "
                            "target, bands at the deciles of the training samples' cosines")
    fusion: bool = Field(False, description="fusion interest: behaviour ID embeddings pooled with the content's weights")
    query_similarity: bool = Field(True, description="the cosine between the target's and the query's representations")
    query_sequence: bool = Field(False, description="content interest (and fusion) over the user's past queries too")
    pooling: Literal["cosine", "softmax"] = Field(
        "cosine", description="behaviour weights: the raw cosines s_b of the paper, averaged, or a softmax of them "
        "with a learned temperature",
    )


class CtrConfig(Section):
    """CTR prediction over stored representations (`moon ctr build|train|eval`)."""

    features: str | None = Field(None, description="YAML feature spec (default: the embedded configs/ctr/features.yaml)")
    representations: str | list[str] | None = Field(
        None, description="store version of the representation features, by name (v2-stage2) or by the model that "
        "made it (stage2, baseline, random, truth); a list trains each representation model once per version "
        "(default: the version the feature spec names)",
    )
    dim: int | None = Field(None, gt=0, description="Matryoshka dim of the representations (default: the spec's)")
    models: list[str] = Field(["dnn", "din", "cube"], description=f"models `moon ctr train` trains: {', '.join(CTR_MODELS)}")
    cube: CubeBranches = Field(default_factory=CubeBranches, description="CUBE branches (ablations)")
    top_k: int | None = Field(None, gt=0, description="keep only the K behaviours most similar to the target, by "
                              "cosine, before any model reads them (SIM-style hard search: long sequences at the cost of K)")
    distinct_items: bool = Field(True, description="each item once in the behaviour sequence: its latest time, its "
                                 "strongest action (a click, a cart and a purchase of one item are one purchase)")
    max_len: int = Field(50, gt=0, le=10_000, description="behaviour items a sample sees (the latest before its ts)")
    query_max_len: int = Field(20, gt=0, le=10_000, description="past queries a sample sees")
    embedding_dim: int = Field(16, gt=0, description="width of every learned ID embedding")
    hidden: list[int] = Field([128, 64], description="the predictor MLP's hidden widths")
    attention_hidden: list[int] = Field([32], description="DIN's attention MLP hidden widths")
    batch_size: int = Field(512, gt=0, description="samples per training step")
    lr: float = Field(4e-3, gt=0, description="Adam's learning rate at the start, falling linearly to 0 over "
                      "max_epochs (the same schedule for every compared model)")
    embedding_decay: float = Field(0.0, ge=0, description="decoupled weight decay of the ID embedding tables (AdamW)")
    max_epochs: int = Field(3, gt=0, description="epochs: the learning rate's schedule ends with the last; early "
                            "stopping on valid AUC ends a run sooner")
    patience: int = Field(2, ge=0, description="epochs without a better valid AUC before stopping")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="training seeds: their spread is the noise floor")
    long_tail_share: float = Field(
        0.5, gt=0, lt=1, description="segment 'long-tail shops': the least shown shops holding this share of shops"
    )
    short_history: int = Field(5, ge=0, description="segment 'short history': users with at most this many behaviours")

    def versions(self) -> list[str | None]:
        """The representation versions to train on, one run each (None: the spec's own)."""
        if isinstance(self.representations, list):
            return list(self.representations) or [None]
        return [self.representations]

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        unknown = sorted(set(models) - set(CTR_MODELS))
        if unknown or not models:
            raise ValueError(f"unknown models {unknown}; choose among {', '.join(CTR_MODELS)}")
        return models


CUBE_ABLATIONS = {  # name -> the overrides that make the variant: a part taken away (no ...) or added (+ ...)
    "no history": ["ctr.cube.content=false", "ctr.cube.histogram=false", "ctr.cube.fusion=false",
                   "ctr.cube.query_sequence=false"],
    "no content": ["ctr.cube.content=false"],
    "no histogram": ["ctr.cube.histogram=false"],
    "no distinct items": ["ctr.distinct_items=false"],
    "+ softmax pooling": ["ctr.cube.pooling=softmax"],
    "+ fusion": ["ctr.cube.fusion=true"],
    "+ query sequence": ["ctr.cube.query_sequence=true"],
    "+ max_len 50": ["ctr.max_len=50"],
}


class StudyConfig(Section):
    """The exchange-rate, scaling and ablation studies (`moon study exchange-rate|scaling|ablation`)."""

    versions: list[str] = Field(
        ["baseline", "untrained", "stage1", "stage2", "random", "truth"],
        description="representations the exchange rate compares (beside the shorter stage-1 runs): a stage the "
        "run trained (add `pretrain` where it pretrains), `untrained` (the backbone before any training) or a "
        "model made without training",
    )
    token_fractions: list[float] = Field(
        [0.0625, 0.125, 0.25, 0.5], description="stage-1 runs of these shares of posttrain.stage1.steps, beside the "
        "run's own: the training-tokens axis, and stage 1 trained less in the exchange rate",
    )
    queue_sizes: list[int] = Field(
        [0, 32, 96, 224, 480], description="stage-2 runs with these temporal-negative queues: the negatives axis "
        "(negatives per query: the stage-2 batch - 1 + the queue)",
    )
    behaviour_lengths: list[int] = Field([2, 4, 8, 16, 32, 64], description="ctr.max_len of the sequence-length axis")
    ablation_versions: list[str] = Field(
        ["truth", "stage2", "baseline", "random"], description="representations `moon study ablation` trains CUBE "
        "over: the oracle's, a learned model's, the non-learned baseline's and the placebo's (what CUBE gains without "
        "any content)",
    )
    ablations: dict[str, list[str]] = Field(
        default_factory=lambda: dict(CUBE_ABLATIONS), description="the CUBE variants `moon study ablation` compares "
        "with the configured CUBE: a name and the config overrides that make it (each also applied to DIN beside it)",
    )

    @field_validator("token_fractions")
    @classmethod
    def _fractions(cls, fractions: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in fractions):
            raise ValueError("token fractions lie strictly between 0 and 1 (the run's own stage 1 is the whole)")
        return sorted(fractions)


class MoonConfig(Section):
    """A whole run: the name of its run directory, the seed, and one section per stage."""

    name: str = Field("demo", description="run name; the run directory defaults to runs/<name>")
    seed: int = Field(0, description="seed of every random process in the run")
    world: WorldConfig = Field(default_factory=WorldConfig, description="the simulated catalogue")
    behaviour: BehaviourConfig = Field(default_factory=BehaviourConfig, description="simulated users and sessions")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="real catalogue ingestion")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="post-training pairs and evaluation set")
    model: ModelConfig = Field(default_factory=ModelConfig, description="backbone and embedding")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="domain-knowledge pretraining")
    posttrain: PosttrainConfig = Field(default_factory=PosttrainConfig, description="contrastive post-training")
    store: StoreConfig = Field(default_factory=StoreConfig, description="versioned catalogue representations")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the HTTP service (moon serve)")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="offline retrieval metrics")
    ctr: CtrConfig = Field(default_factory=CtrConfig, description="CTR prediction over stored representations")
    study: StudyConfig = Field(default_factory=StudyConfig, description="exchange-rate and scaling studies")

    def with_overrides(self, *overrides: str) -> MoonConfig:
        """This config with `section.key=value` overrides applied (as on the command line)."""
        return _validated(self.model_dump(mode="json"), overrides, "this config")

    def digest(self, *sections: str) -> str:
        """Hash of the given sections (and the seed): a stage's outputs are current when it matches."""
        data = self.model_dump(mode="json", exclude=_how_not_what(type(self)))
        picked = {key: data[key] for key in ("seed", *sections)}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _how_not_what(section: type[BaseModel]) -> dict:
    """The `HOW_NOT_WHAT` fields of a section and its sub-sections, as a pydantic `exclude`."""
    exclude = {}
    for name, field in section.model_fields.items():
        if field.json_schema_extra == HOW_NOT_WHAT:
            exclude[name] = True
        elif isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            exclude[name] = _how_not_what(field.annotation)
    return {name: value for name, value in exclude.items() if value}


DEFAULT_CONFIG = "demo.yaml"


def default_config_path() -> Path:
    return Path(str(resources.files("moon") / "configs" / DEFAULT_CONFIG))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> MoonConfig:
    """Loads a YAML config (default: the embedded demo.yaml) and applies `section.key=value` overrides.

    A config may start from another with `base: FILE` (a path relative to it, or the name of an
    embedded config such as demo.yaml): its keys are applied over the base's, section by section.
    The run's name is the config's own (`name`, else its file name), never the base's.
    """
    path = Path(path) if path else default_config_path()
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    return _validated(data, overrides, path.name)


def _validated(data: dict, overrides: Sequence[str], source: str) -> MoonConfig:
    """`data` with the overrides applied, as a validated config (a UserError says what is wrong)."""
    for override in overrides:
        _apply_override(data, override)
    try:
        return MoonConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"invalid config ({source} + overrides): {describe_errors(exc)}") from None


MAX_BASES = 8  # base: chains longer than this are a loop


def _read_yaml(path: Path, depth: int = 0) -> dict:
    """The mapping a config file holds, over the one its `base:` names."""
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass an existing YAML file to -c/--config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if depth >= MAX_BASES:
        raise UserError(f"config file {path}: `base:` files name each other in a loop")
    beside = path.parent / str(base)
    inherited = _read_yaml(beside if beside.is_file() else default_config_path().with_name(str(base)), depth + 1)
    inherited.pop("name", None)
    return _merged(inherited, data)


def _merged(base: dict, over: dict) -> dict:
    """`over` applied to `base`: sections merge key by key, any other value replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise UserError(f"override '{override}' must look like section.key=value, e.g. world.items=500")
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        if node.get(part) is None:  # absent, or `columns: null` in the file
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"override '{override}': '{'.'.join(parents[: i + 1])}' is a value, not a section")
    node[leaf] = _parse_value(raw)


def _parse_value(raw: str) -> Any:
    """YAML scalars and lists (`500`, `0.2`, `true`, `null`, `[a, b]`); dates and odd text stay strings."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, (dt.date, dt.datetime)) else value


def describe_errors(exc: ValidationError) -> str:
    return "; ".join(_describe(err) for err in exc.errors())


def _describe(err: dict) -> str:
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(err["loc"][:-1]))
        return f"unknown key '{key}' (allowed here: {allowed})"
    return f"'{key}': {err['msg']} (got {err.get('input')!r})"


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = MoonConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        model = next(a for a in (annotation, *getattr(annotation, "__args__", ())) if _is_model(a))
    return list(model.model_fields)


def _is_model(candidate: Any) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, BaseModel)


def render_yaml(config: BaseModel, indent: int = 0) -> str:
    """The config as YAML, each key preceded by its description as a comment."""
    lines = []
    pad = " " * indent
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.append(render_yaml(value, indent + 2))
        else:
            dumped = yaml.safe_dump({name: _plain(value)}, default_flow_style=True, width=1000).strip()
            lines.append(pad + dumped.removeprefix("{").removesuffix("}"))
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.date) else value
