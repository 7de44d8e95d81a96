"""Simulated shoppers: users with latent tastes, search sessions, a noisy search engine, a click model.

A session is one query (text, or a user photo of a product the shopper has in mind),
the engine's ranked impressions, then clicks, carts and purchases. Clicks follow a
position-based model: the chance of examining rank p decays with p, and the chance of
clicking an examined item is

    σ(click_bias + relevance_weight·relevance + taste_weight·fit + appeal_weight·appeal)

with relevance to the query; fit, how well the item suits this shopper (visual style,
favourite colours and brands, price band, and hidden facts no image or text shows); and
appeal, how much everyone likes the item: part seen in its image (its finish), part hidden
(only its clicks reveal it, so a warm item's ID learns it and a new item cannot). Visual
style and finish are visible only in images, so content that item IDs cannot see carries
real signal. Items exist only from their launch time on (new items: cold start). What the
click model knew of every impression goes to `impression_truth`, for the ceilings that
`moon eval world` and `moon ctr eval` print.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from moon.config import BehaviourConfig
from moon.io import schema
from moon.queries import query_id
from moon.sources.simulate.catalog import SECONDS_PER_DAY, unix_seconds
from moon.sources.simulate.market import Market
from moon.sources.simulate.photos import user_photo
from moon.sources.simulate.vocab import REGIONS

FAVOURITES = 3  # colours and brands a user favours
FAVOURITE_LEAVES = 5
OTHER_PRODUCTS = (0.4, 0.35, 0.25)  # chance of 0, 1 and 2 other products in a shopper's photo
HIDDEN_TASTE_WEIGHT = 0.3  # fit from facts no image or text shows, per unit of their dot product
POOL = 40  # items a shopper has in mind when forming a query
CANDIDATES = 150  # items the engine scores per query


@dataclass
class Users:
    ids: np.ndarray  # str
    region: np.ndarray  # int: index into region_names
    region_names: list[str]
    style: np.ndarray  # float32 (u, d): preferred visual style
    hidden_taste: np.ndarray  # float32 (u, k): what the shopper likes in the items' hidden facts
    colours: np.ndarray  # int (u, FAVOURITES), -1 where the market has too few colours
    brands: np.ndarray  # int (u, FAVOURITES)
    price_band: np.ndarray  # int8
    activity: np.ndarray  # float32: relative number of sessions
    leaves: np.ndarray  # int (u, FAVOURITE_LEAVES): categories the user shops in
    leaf_weights: np.ndarray  # float (u, FAVOURITE_LEAVES)
    region_leaf_popularity: np.ndarray  # float (regions, leaves), rows sum to 1

    def __len__(self) -> int:
        return len(self.ids)


def make_users(market: Market, config: BehaviourConfig, seed: int) -> Users:
    rng = np.random.default_rng([seed, 5])
    n, n_leaves = config.users, int(market.leaf.max()) + 1
    region_share = 1.0 / (np.arange(config.regions) + 2.0)
    region = rng.choice(config.regions, n, p=region_share / region_share.sum())
    # Regions differ in what they buy: item share per leaf, tilted per region.
    leaf_share = np.bincount(market.leaf, minlength=n_leaves).astype(float)
    popularity = leaf_share * rng.lognormal(0, 0.6, (config.regions, n_leaves))
    popularity /= popularity.sum(1, keepdims=True)
    k = min(FAVOURITE_LEAVES, n_leaves)
    leaves = np.stack([rng.choice(n_leaves, k, replace=False, p=popularity[r]) for r in region])
    brand_share = np.bincount(market.brand[market.brand >= 0], minlength=len(market.brand_words)) + 1.0
    return Users(
        ids=np.char.mod("user%06d", np.arange(n)),
        region=region,
        region_names=REGIONS[: config.regions],
        style=rng.uniform(-1, 1, (n, market.style.shape[1])).astype(np.float32),
        hidden_taste=rng.standard_normal((n, market.hidden_taste.shape[1])).astype(np.float32),
        colours=_favourites(rng, n, len(market.colour_words)),
        brands=np.stack([rng.choice(len(brand_share), FAVOURITES, p=brand_share / brand_share.sum()) for _ in range(n)]),
        price_band=rng.integers(0, 4, n).astype(np.int8),
        activity=rng.lognormal(0, config.activity_spread, n).astype(np.float32),
        leaves=leaves,
        leaf_weights=rng.dirichlet(np.ones(k), n),
        region_leaf_popularity=popularity,
    )


def _favourites(rng, n: int, choices: int) -> np.ndarray:
    if choices == 0:
        return np.full((n, FAVOURITES), -1)
    picked = np.stack([rng.permutation(choices)[:FAVOURITES] for _ in range(n)])
    return np.pad(picked, ((0, 0), (0, FAVOURITES - picked.shape[1])), constant_values=-1)


def users_table(users: Users, market: Market) -> pa.Table:
    def words(codes, names):
        return [[names[c] if isinstance(names[c], str) else names[c][0] for c in row if c >= 0] for row in codes]

    return pa.table(
        {
            "user_id": users.ids,
            "region": [users.region_names[r] for r in users.region],
            "style_taste": list(users.style),
            "colours": words(users.colours, market.colour_words),
            "price_band": users.price_band,
            "brands": words(users.brands, market.brand_words),
            "activity": users.activity,
        },
        schema=schema.USERS,
    )


def taste(market: Market, users: Users, u: int, items: np.ndarray) -> np.ndarray:
    """How well items fit user u, roughly centred on 0: style closeness, colour, brand, price,
    and the hidden facts."""
    distance = np.linalg.norm(market.style[items] - users.style[u], axis=1) / np.sqrt(market.style.shape[1])
    score = 0.6 - distance
    hidden = market.hidden_taste[items]
    score += HIDDEN_TASTE_WEIGHT * (hidden @ users.hidden_taste[u]) / np.sqrt(hidden.shape[1])
    score += 0.5 * np.isin(market.colour[items], users.colours[u][users.colours[u] >= 0])
    score += 0.4 * np.isin(market.brand[items], users.brands[u])
    band = market.price_band[items]
    score -= np.where(band >= 0, 0.25 * np.abs(band - users.price_band[u]), 0.0)
    return score - 0.25


def appeal(market: Market, items: np.ndarray, visible_share: float) -> np.ndarray:
    """How much everyone likes items, with a spread of about 0.58: the share `visible_share` of
    its variance from the finish seen in the image, the rest hidden."""
    return np.sqrt(visible_share) * market.finish[items] + np.sqrt(1 - visible_share) * market.hidden_appeal[items]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


@dataclass
class Query:
    leaf: int
    intent: int  # the item the shopper has in mind (and photographs, for an image query)
    text: str | None = None
    photo: bytes | None = None
    colour: int = -1  # constraints a text query names
    brand: int = -1
    attr: int = -1


class Sessions:
    """Generates one day of the behaviour log at a time."""

    def __init__(self, market: Market, users: Users, config: BehaviourConfig, seed: int):
        self.market, self.users, self.config, self.seed = market, users, config, seed
        self.start = unix_seconds(config.start_date)
        # Items of each leaf, ordered by launch time, so "available at ts" is a prefix.
        self.by_leaf = [np.flatnonzero(market.leaf == leaf) for leaf in range(int(market.leaf.max()) + 1)]
        self.by_leaf = [idx[np.argsort(market.created_at[idx], kind="stable")] for idx in self.by_leaf]
        self.launch = [market.created_at[idx] for idx in self.by_leaf]
        self.group_leaves = {g: np.unique(market.leaf[market.group == g]) for g in np.unique(market.group)}
        self.leaf_group = np.zeros(len(self.by_leaf), dtype=np.int64)
        self.leaf_group[market.leaf] = market.group
        order = np.argsort(market.spu, kind="stable")
        self.spu_order = order
        self.spu_bounds = np.searchsorted(market.spu[order], np.arange(int(market.spu.max()) + 2))
        counts_rng = np.random.default_rng([seed, 6])
        rate = users.activity[:, None] * config.sessions_per_user_day
        self.session_counts = counts_rng.poisson(np.repeat(rate, config.days, axis=1))  # (users, days)

    def total_sessions(self) -> int:
        return int(self.session_counts.sum())

    def available(self, leaf: int, ts: int) -> np.ndarray:
        return self.by_leaf[leaf][: np.searchsorted(self.launch[leaf], ts, side="right")]

    def day(self, day: int, advance=lambda n=1: None) -> tuple[pa.Table, pa.Table, pa.Table]:
        """One day of the log: its events, what each session's query was about (`QUERY_TRUTH`
        rows, one per session: a query searched in several sessions repeats), and what the
        click model knew of each impression (`IMPRESSION_TRUTH`)."""
        rng = np.random.default_rng([self.seed, 7, day])
        rows: dict[str, list] = {name: [] for name in schema.EVENTS.names}
        truths: dict[str, list] = {name: [] for name in schema.QUERY_TRUTH.names}
        shown: list[dict] = []
        for u in range(len(self.users)):
            count = self.session_counts[u, day]
            times = np.sort(self.start + day * SECONDS_PER_DAY + rng.integers(0, SECONDS_PER_DAY - 3600, count))
            for k, ts in enumerate(times):
                self._session(u, int(ts), f"{self.users.ids[u]}-d{day:03d}-{k}", rng, rows, truths, shown)
                advance()
        rows["ts"] = np.array(rows["ts"], dtype="datetime64[s]").astype("datetime64[ms]")
        return (pa.table(rows, schema=schema.EVENTS), pa.table(truths, schema=schema.QUERY_TRUTH),
                _impression_truth(shown, day, self.market.item_ids))

    def _session(self, u: int, ts: int, session_id: str, rng, rows: dict, truths: dict, shown_log: list) -> None:
        query = self._query(u, ts, rng)
        if query is None:
            return
        self._record_truth(query, truths)
        candidates = self._candidates(query, ts, rng)
        relevance = self._relevance(query, candidates)
        c = self.config
        fresh = (ts - self.market.created_at[candidates]) < 7 * SECONDS_PER_DAY  # engines boost new items
        score = relevance + c.new_item_boost * fresh + c.ranker_noise * 0.35 * rng.standard_normal(len(candidates))
        top = np.argsort(-score, kind="stable")[: c.results_per_query]
        shown, relevance = candidates[top], relevance[top]
        fit = taste(self.market, self.users, u, shown)
        liked = appeal(self.market, shown, c.appeal_visible_share)
        examined = c.position_decay ** np.arange(len(shown))
        chance = examined * _sigmoid(c.click_bias + c.relevance_weight * relevance + c.taste_weight * fit
                                     + c.appeal_weight * liked)
        clicked = rng.random(len(shown)) < chance
        shown_log.append({"request_id": session_id, "item": shown, "relevance": relevance, "fit": fit,
                          "appeal": liked, "finish": self.market.finish[shown], "probability": chance,
                          "clicked": clicked})
        carted = clicked & (rng.random(len(shown)) < _sigmoid(_logit(c.cart_rate) + fit + relevance - 0.5))
        bought = carted & (rng.random(len(shown)) < _sigmoid(_logit(c.purchase_rate) + fit))
        user_id, region = self.users.ids[u], self.users.region_names[self.users.region[u]]
        ids = self.market.item_ids
        for position, item in enumerate(shown):
            t = ts
            for action, happened, delay in (
                ("impression", True, 0),
                ("click", clicked[position], 5 + 4 * position),
                ("cart", carted[position], 60),
                ("purchase", bought[position], 300),
            ):
                if not happened:
                    break
                t += int(delay * (1 + rng.random()))
                rows["ts"].append(t)
                rows["user_id"].append(user_id)
                rows["session_id"].append(session_id)
                rows["region"].append(region)
                rows["query_text"].append(query.text)
                rows["query_image"].append(query.photo)
                rows["item_id"].append(ids[item].as_py())
                rows["position"].append(position + 1)
                rows["action"].append(action)

    def _record_truth(self, query: Query, truths: dict) -> None:
        truths["query_id"].append(query_id(query.text, query.photo))
        truths["item_id"].append(self.market.item_ids[query.intent].as_py())
        truths["names_colour"].append(query.colour >= 0)
        truths["names_brand"].append(query.brand >= 0)
        truths["names_attribute"].append(query.attr >= 0)

    def _query(self, u: int, ts: int, rng) -> Query | None:
        users, market = self.users, self.market
        for _ in range(3):  # a leaf may have nothing launched yet: try another
            if rng.random() < 0.75:
                leaf = int(rng.choice(users.leaves[u], p=users.leaf_weights[u]))
            else:
                popularity = users.region_leaf_popularity[users.region[u]]
                leaf = int(rng.choice(len(popularity), p=popularity))
            available = self.available(leaf, ts)
            if len(available):
                break
        else:
            return None
        pool = available if len(available) <= POOL else available[rng.integers(0, len(available), POOL)]
        weight = np.exp(2.0 * taste(market, users, u, pool))
        intent = int(pool[rng.choice(len(pool), p=weight / weight.sum())])
        if rng.random() < self.config.image_query_share:
            others = [market.image(int(i)) for i in self._around(available, intent, rng)]
            photo = user_photo(market.image(intent), rng, self.config.photo_size, others)
            return Query(leaf=leaf, intent=intent, photo=photo)
        return self._text_query(leaf, intent, rng)

    def _around(self, same_leaf: np.ndarray, intent: int, rng) -> np.ndarray:
        """Other products in the shopper's photo: none, one or two, half of them of its leaf
        (a shop's shelf, a wardrobe), the rest anything."""
        count = int(rng.choice(3, p=OTHER_PRODUCTS))
        picks = np.where(rng.random(count) < 0.5, same_leaf[rng.integers(0, len(same_leaf), count)],
                         rng.integers(0, len(self.market), count))
        return picks[picks != intent]

    def _text_query(self, leaf: int, intent: int, rng) -> Query:
        """Words a shopper types: a name of the category, maybe a colour, brand, attribute, gender."""
        market, query = self.market, Query(leaf=leaf, intent=intent)
        words = []
        gender = market.gender[intent]
        if gender >= 0 and rng.random() < 0.4:
            words.append(_pick(market.gender_words[gender], rng))
        if market.colour[intent] >= 0 and rng.random() < 0.5:
            query.colour = int(market.colour[intent])
            words.append(_pick(market.colour_words[query.colour], rng))
        if market.brand[intent] >= 0 and rng.random() < 0.2:
            query.brand = int(market.brand[intent])
            words.append(market.brand_words[query.brand])
        if market.attr[intent] >= 0 and rng.random() < 0.25:
            query.attr = int(market.attr[intent])
            words.append(market.attr_words[query.attr])
        words.append(_pick(market.leaf_words[leaf], rng))
        query.text = " ".join(words).lower()
        return query

    def _candidates(self, query: Query, ts: int, rng) -> np.ndarray:
        """What the engine retrieves: items of the query's leaf, some of sibling leaves, and for an
        image query the photographed product's SKUs (image search finds near-duplicates)."""
        same_leaf = self.available(query.leaf, ts)
        if len(same_leaf) > CANDIDATES:
            same_leaf = same_leaf[rng.choice(len(same_leaf), CANDIDATES, replace=False)]
        parts = [same_leaf, [query.intent]]
        siblings = self.group_leaves[self.leaf_group[query.leaf]]
        if len(siblings) > 1:
            other = self.available(int(rng.choice(siblings[siblings != query.leaf])), ts)
            parts.append(other[rng.integers(0, len(other), min(len(other), 10))])
        if query.photo is not None:
            spu = self.market.spu[query.intent]
            parts.append(self.spu_order[self.spu_bounds[spu] : self.spu_bounds[spu + 1]])
        candidates = np.unique(np.concatenate(parts).astype(np.int64))
        return candidates[self.market.created_at[candidates] <= ts]

    def _relevance(self, query: Query, items: np.ndarray) -> np.ndarray:
        """True relevance in [0, 1] (the engine sees it only through noise)."""
        market = self.market
        same_leaf = market.leaf[items] == query.leaf
        category = np.where(same_leaf, 1.0, np.where(market.group[items] == self.leaf_group[query.leaf], 0.25, 0.0))
        if query.photo is not None:
            distance = np.linalg.norm(market.style[items] - market.style[query.intent], axis=1)
            look_alike = 0.15 + 0.25 * (market.colour[items] == market.colour[query.intent])
            look_alike += 0.3 * np.clip(1 - distance / 2, 0, 1)
            same_product = market.spu[items] == market.spu[query.intent]
            return np.where(items == query.intent, 1.0, np.where(same_product, 0.75, category * look_alike))
        checks = [
            market.colour[items] == query.colour if query.colour >= 0 else None,
            market.brand[items] == query.brand if query.brand >= 0 else None,
            market.attr[items] == query.attr if query.attr >= 0 else None,
        ]
        named = [c for c in checks if c is not None]
        matched = np.mean(named, axis=0) if named else np.ones(len(items))
        return category * (0.4 + 0.6 * matched)


def _impression_truth(sessions: list[dict], day: int, item_ids: pa.Array) -> pa.Table:
    """One row per impression of the day: what the click model knew when it showed the item."""
    if not sessions:
        return schema.IMPRESSION_TRUTH.empty_table()
    counts = [len(s["item"]) for s in sessions]
    column = lambda key: np.concatenate([s[key] for s in sessions])  # noqa: E731
    return pa.table(
        {
            "request_id": np.repeat([s["request_id"] for s in sessions], counts),
            "item_id": item_ids.take(pa.array(column("item").astype(np.int64))),
            "position": np.concatenate([np.arange(1, n + 1) for n in counts]).astype(np.int16),
            "day": np.full(sum(counts), day, np.int16),
            **{key: column(key).astype(np.float32) for key in ("relevance", "fit", "appeal", "finish", "probability")},
            "clicked": column("clicked"),
        },
        schema=schema.IMPRESSION_TRUTH,
    )


def _pick(words: list[str], rng) -> str:
    return words[rng.integers(len(words))]
