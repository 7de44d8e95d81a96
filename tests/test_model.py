"""The backbone and the Embedder: bidirectional attention, mean pooling, Matryoshka, inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from moon.config import load_config
from moon.errors import UserError
from moon.model.backbone import set_bidirectional
from moon.model.embedder import Embedder
from moon.model.inputs import Input
from moon.model.tokenizer import IMAGE_PAD, SPECIAL_TOKENS
from moon.model.vision_attention import SameSizeImagesAttention, VisionAttention

CORPUS = ["red cotton shirt", "blue denim jeans size m", "black leather ankle boots", "green ceramic mug"] * 30


@pytest.fixture(scope="module")
def embedder():
    return Embedder.create(load_config().model, CORPUS, seed=0)


def picture(colour, size=80):
    return Image.new("RGB", (size, size), colour)


def hidden_states(embedder, text):
    batch = embedder.collate([Input(text=text)])
    with torch.no_grad():
        return embedder.backbone(**batch, use_cache=False).last_hidden_state[0]


def test_a_later_token_changes_an_earlier_one_only_with_bidirectional_attention(embedder):
    a, b = "red cotton shirt", "red cotton jeans"  # same first tokens, different last one
    assert embedder.collate([Input(text=a)])["input_ids"][0, 0] == embedder.collate([Input(text=b)])["input_ids"][0, 0]
    changed = (hidden_states(embedder, a)[0] - hidden_states(embedder, b)[0]).abs().max()
    set_bidirectional(embedder.backbone, False)
    try:
        causal = (hidden_states(embedder, a)[0] - hidden_states(embedder, b)[0]).abs().max()
    finally:
        set_bidirectional(embedder.backbone, True)
    assert changed > 1e-3 and causal < 1e-6


def test_padding_does_not_change_an_embedding(embedder):
    short = Input(text="red shirt")
    alone = embedder.encode([short])
    padded = embedder.encode([short, Input(text="black leather ankle boots with a long description", image=picture("red"))])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)


def test_every_view_encodes_to_unit_vectors_and_mixed_batches_match_single_inputs(embedder):
    inputs = [
        Input(text="green ceramic mug"),
        Input(image=picture((40, 150, 70))),
        Input(text="red cotton shirt", image=picture((200, 30, 40))),
    ]
    together = embedder.encode(inputs)
    assert together.shape == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    for i, item in enumerate(inputs):
        np.testing.assert_allclose(embedder.encode([item])[0], together[i], atol=1e-5)
    # an image changes the representation of the same text
    assert np.abs(together[2] - embedder.encode([Input(text="red cotton shirt")])[0]).max() > 1e-3


def test_matryoshka_dims_are_renormalised_prefixes(embedder):
    inputs = [Input(text="blue denim jeans"), Input(image=picture("blue"))]
    full = embedder.encode(inputs)
    for dim in embedder.settings.matryoshka_dims:
        small = embedder.encode(inputs, dim=dim)
        expected = full[:, :dim] / np.linalg.norm(full[:, :dim], axis=1, keepdims=True)
        np.testing.assert_allclose(small, expected, atol=1e-5)
    with pytest.raises(UserError, match="Matryoshka"):
        embedder.encode(inputs, dim=50)


def test_patches_match_the_reference_qwen2vl_image_processor(embedder):
    from transformers import Qwen2VLImageProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    size = embedder.settings.image_size
    reference = Qwen2VLImageProcessor(
        patch_size=embedder.collate.patch, merge_size=2, temporal_patch_size=2,
        min_pixels=size * size, max_pixels=size * size,
    )(images=[image], return_tensors="pt")
    values, grid = embedder.collate.patchify([image])
    assert grid.tolist() == reference["image_grid_thw"].tolist()
    torch.testing.assert_close(values, reference["pixel_values"].float(), atol=2e-2, rtol=0)


def test_the_local_tokenizer_has_the_vision_tokens_and_one_pad_per_merged_patch(embedder):
    ids = embedder.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    batch = embedder.collate([Input(text="red", image=picture("red"))])
    side = embedder.settings.image_size // embedder.collate.patch
    assert int((batch["input_ids"] == embedder.tokenizer.convert_tokens_to_ids(IMAGE_PAD)).sum()) == (side // 2) ** 2


def test_save_and_load_give_the_same_embeddings(embedder, tmp_path):
    inputs = [Input(text="black leather ankle boots", image=picture("black")), Input(text="mug")]
    before = embedder.encode(inputs)
    after = Embedder.load(embedder.save(tmp_path / "ckpt")).encode(inputs)
    np.testing.assert_allclose(before, after, atol=1e-6)


def test_bad_sizes_are_refused_with_the_key_to_fix():
    settings = load_config(None, ["model.image_size=60"]).model
    with pytest.raises(UserError, match="model.image_size"):
        Embedder.create(settings, CORPUS)


def test_vision_attention_over_same_size_images_in_one_call_matches_qwen2vl_per_image_attention(embedder):
    attention = next(m for m in embedder.modules() if isinstance(m, SameSizeImagesAttention))
    generator = torch.Generator().manual_seed(0)
    patches, dim = 3 * 16, attention.dim
    hidden = torch.randn(patches, dim, generator=generator)
    angles = torch.randn(patches, attention.head_dim, generator=generator)
    rotary = (angles.cos(), angles.sin())
    same_sizes = torch.tensor([0, 16, 32, 48])
    mixed_sizes = torch.tensor([0, 8, 32, 48])
    for bounds in (same_sizes, mixed_sizes):
        batched = attention(hidden, bounds, rotary)
        per_image = VisionAttention.forward(attention, hidden, bounds, rotary)
        torch.testing.assert_close(batched, per_image, atol=1e-5, rtol=1e-5)
    # attention stays within each image: changing one image leaves the others alone
    changed = hidden.clone()
    changed[:16] += 1.0
    assert torch.equal(attention(changed, same_sizes, rotary)[16:], attention(hidden, same_sizes, rotary)[16:])


def test_cached_rotary_positions_are_the_library_positions_and_give_the_same_embeddings(embedder):
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)) for _ in range(3)]
    batch = embedder.collate([Input("red cotton shirt", photos[0]), Input("blue denim jeans size m"),
                              Input(image=photos[1]), Input("mug", photos[2]), Input("red cotton shirt", photos[1])])
    library, _ = embedder.backbone.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"])
    embedder.positions.layouts.clear()
    cached = embedder.positions(batch)
    assert torch.equal(cached, library)
    assert len(embedder.positions.layouts) == 4  # the first and last rows share a layout
    with torch.no_grad():
        with_cache = embedder(batch)
        without = embedder.backbone(**batch, use_cache=False).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((without * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(with_cache, pooled, rtol=0, atol=1e-6)
