"""Drawn catalogue images (simulate.render), shoppers' photos of them (simulate.photos), and the one image decoder."""

import colorsys
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import TINY_MODEL
from moon.io.images import decode as decode_image
from moon.sources.simulate.photos import _occlude, user_photo
from moon.sources.simulate.render import (
    BACKGROUND,
    MARKS,
    PATTERNS,
    SHAPES,
    Look,
    draw_item,
    encode_png,
)

SIZE = 64
STYLE_AXES = ("roundness", "boldness", "tone", "ornament")


def look(shape="tshirt", pattern="stripes", style=(0.0, 0.0, 0.0, 0.0), **changes) -> Look:
    base = dict(
        shape=shape,
        proportions=(0.5, 0.5, 0.5),
        colour=(40, 100, 210),
        pattern=pattern,
        pattern_colour=(240, 210, 40),
        mark="star",
        mark_colour=(200, 30, 40),
        style=tuple(style),
        seed=7,
    )
    return Look(**{**base, **changes})


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def product_mask(image) -> np.ndarray:
    """Pixels that differ visibly from the catalogue background."""
    return np.abs(pixels(image) - BACKGROUND).max(axis=2) > 12


def random_look(rng, i: int) -> Look:
    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    return Look(
        shape=str(rng.choice(SHAPES)),
        proportions=tuple(float(p) for p in rng.uniform(0.1, 0.9, 3)),
        colour=colour(),
        pattern=str(rng.choice(PATTERNS)),
        pattern_colour=colour(),
        mark=str(rng.choice(MARKS)),
        mark_colour=colour(),
        style=tuple(float(s) for s in rng.uniform(-1, 1, 4)),
        seed=i,
    )


# ---------------------------------------------------------------- catalogue images


def test_vocabularies():
    assert PATTERNS[0] == "solid"  # catalog.PATTERN_WEIGHTS gives the first pattern the largest share
    assert {"stripes", "dots", "checks", "zigzag", "gradient"} <= set(PATTERNS)
    assert len(MARKS) >= 8 and len(set(MARKS)) == len(MARKS)
    required = """tshirt shirt dress skirt trousers shorts jacket sweater sneaker boot heel sandal handbag backpack
        wallet watch hat cap scarf sunglasses necklace mug bottle lamp chair pillow phone headphones laptop
        perfume lipstick plush"""
    assert set(required.split()) <= set(SHAPES)


def test_same_look_gives_the_same_png():
    a, b = encode_png(draw_item(look(), SIZE)), encode_png(draw_item(look(), SIZE))
    assert a == b
    image = Image.open(io.BytesIO(a))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
    assert encode_png(draw_item(look(seed=8), SIZE)) != a  # the seed moves the pattern and the mark


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_a_centred_packshot_on_near_white(shape):
    for pattern, style in [("solid", (-1, -1, -1, -1)), ("dots", (0, 0, 0, 0)), ("zigzag", (1, 1, 1, 1))]:
        image = draw_item(look(shape, pattern, style, colour=(25, 25, 28)), SIZE)
        a = np.asarray(image)
        assert image.mode == "RGB" and a.shape == (SIZE, SIZE, 3)
        border = np.concatenate([edge.reshape(-1, 3) for edge in (a[:2], a[-2:], a[:, :2], a[:, -2:])])
        assert border.min() >= 235, f"{shape}: the product touches the border"
        mask = product_mask(image)
        assert 0.1 <= mask.mean() <= 0.75, f"{shape}/{pattern}: product covers {mask.mean():.0%} of the frame"
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) >= 0.75 * SIZE  # fills most of the frame
        centre = np.array([rows[0] + rows[-1], cols[0] + cols[-1]]) / 2
        assert np.abs(centre - (SIZE - 1) / 2).max() <= 0.06 * SIZE


def test_unknown_names_are_rejected():
    for bad in (dict(shape="spaceship"), dict(pattern="paisley"), dict(mark="logo")):
        with pytest.raises(ValueError):
            draw_item(look(**bad), SIZE)


def test_shapes_have_clearly_different_silhouettes():
    masks = {shape: product_mask(draw_item(look(shape, "solid"), SIZE)) for shape in SHAPES}
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1 :]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.9, f"{a} and {b} look alike (IoU {iou:.2f})"


def test_leaf_proportions_vary_a_shared_silhouette():
    for shape in SHAPES:
        a = product_mask(draw_item(look(shape, "solid", proportions=(0.1, 0.9, 0.1)), SIZE))
        b = product_mask(draw_item(look(shape, "solid", proportions=(0.9, 0.1, 0.9)), SIZE))
        assert (a & b).sum() / (a | b).sum() < 0.95, shape


@pytest.mark.parametrize("axis", range(4), ids=STYLE_AXES)
def test_style_axes_change_the_image_continuously(axis):
    for shape, pattern in [("tshirt", "stripes"), ("handbag", "dots"), ("boot", "solid")]:

        def image(value):
            style = [0.0] * 4
            style[axis] = value
            return pixels(draw_item(look(shape, pattern, style), SIZE))

        start = image(-0.7)
        small = np.abs(image(-0.6) - start).mean()
        large = np.abs(image(0.8) - start).mean()
        assert large > 1.5, f"{STYLE_AXES[axis]} barely shows on {shape}"
        assert small < 0.25 * large, f"{STYLE_AXES[axis]} jumps on {shape}: {small:.2f} vs {large:.2f}"


def test_tone_keeps_the_hue():
    for colour in [(200, 30, 40), (40, 150, 70), (40, 100, 210), (240, 130, 30)]:
        hues = []
        for tone in (-1.0, 1.0):
            a = np.asarray(draw_item(look("pillow", "solid", (0, -1, tone, -1), colour=colour, mark="bar"), SIZE))
            r, g, b = np.median(a[SIZE // 2 - 4 : SIZE // 2 + 4, SIZE // 4 : SIZE // 2].reshape(-1, 3), axis=0) / 255
            hues.append(colorsys.rgb_to_hsv(r, g, b))
        (pastel_hue, pastel_sat, _), (vivid_hue, vivid_sat, _) = hues
        assert min(abs(pastel_hue - vivid_hue), 1 - abs(pastel_hue - vivid_hue)) < 0.04
        assert vivid_sat > pastel_sat + 0.2


# ---------------------------------------------------------------- user photos


def hue_histogram(image, weight) -> np.ndarray:
    """Hue x saturation histogram of the colourful pixels: robust to lighting and to grey clutter."""
    a = np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float64) / 255
    hsv = np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR).convert("HSV"), dtype=np.float64) / 256
    hue, sat, val = hsv[..., 0], hsv[..., 1], a.max(axis=2)
    w = weight * np.clip((sat - 0.15) * 5, 0, 1) * np.clip((val - 0.15) * 5, 0, 1)
    codes = (hue * 12).astype(int) * 3 + np.minimum((sat * 3).astype(int), 2)
    h = np.bincount(codes.ravel(), w.ravel(), 36)
    return np.sqrt(h / (h.sum() + 1e-9))


def test_user_photo_is_a_reproducible_jpeg():
    catalogue = draw_item(look(), 96)
    a = user_photo(catalogue, np.random.default_rng(3), 96)
    assert a == user_photo(catalogue, np.random.default_rng(3), 96)
    assert a != user_photo(catalogue, np.random.default_rng(4), 96)
    photo = Image.open(io.BytesIO(a))
    assert photo.format == "JPEG" and photo.mode == "RGB" and photo.size == (96, 96)
    assert decode_image(a).size == (96, 96)


def test_user_photos_show_their_product_but_colour_alone_does_not_name_it():
    rng = np.random.default_rng(11)
    catalogue = [draw_item(random_look(rng, i), 96) for i in range(40)]
    photos = [decode_image(user_photo(image, rng, 96)) for image in catalogue]

    distance = [np.abs(pixels(p) - pixels(c)).mean() for p, c in zip(photos, catalogue)]
    assert min(distance) > 10 and np.mean(distance) > 40

    centre = np.exp(-((np.arange(32) + 0.5) / 32 - 0.5) ** 2 / (2 * 0.25**2))
    centre = centre[:, None] * centre[None, :]  # the product is somewhere near the middle of a photo
    index = np.stack([hue_histogram(c, product_mask(c.resize((32, 32), Image.BILINEAR))) for c in catalogue])
    hits = sum(int(np.argmax(index @ hue_histogram(p, centre))) == i for i, p in enumerate(photos))
    # Chance is 1/40. Real shop photos defeat a colour histogram most of the time; when the product
    # filled a centred frame under mild light, it named the item in 1 photo of 2.
    assert 0.1 <= hits / len(photos) < 0.5


def test_user_photo_of_a_real_product_photo():
    photo = Image.new("RGB", (60, 80), (255, 255, 255))
    draw = ImageDraw.Draw(photo)
    draw.polygon([(18, 8), (42, 8), (56, 26), (47, 32), (45, 74), (15, 74), (13, 32), (4, 26)], fill=(190, 40, 50))
    draw.ellipse([24, 4, 36, 14], fill=(255, 255, 255))  # neckline
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=75)
    real = decode_image(buffer.getvalue())

    shares = []
    for seed in range(10):
        shot = decode_image(user_photo(real, np.random.default_rng(seed), 72))
        assert shot.size == (72, 72)
        a = pixels(shot)
        hsv = np.asarray(shot.convert("HSV"), dtype=np.int32)  # red by hue: exposure and white balance vary
        red = ((hsv[..., 0] < 14) | (hsv[..., 0] > 241)) & (hsv[..., 1] > 110) & (hsv[..., 2] > 50)
        assert 0.01 < red.mean() < 0.4, f"the red shirt covers {red.mean():.0%} of the photo"
        shares.append(red.mean())
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert np.abs(border - 255).max(axis=1).mean() > 20  # a scene, not the white studio background
    # A shopper's product takes a third to two thirds of the frame's side, not the whole frame.
    assert np.mean(shares) < 0.25


def test_occlusion_covers_at_most_a_quarter_of_the_product():
    size = 64
    alpha = np.zeros((size, size), dtype=np.float32)
    alpha[12:52, 20:44] = 1.0
    covered = []
    for seed in range(60):
        photo = np.zeros((size, size, 3), dtype=np.float32)
        _occlude(photo, alpha, np.random.default_rng(seed))
        cover = photo.max(axis=2) / max(photo.max(), 1e-6)  # 1 where the cover is solid, soft at its edge
        covered.append(float(cover[alpha > 0].mean()))
    assert max(covered) <= 0.25
    assert np.mean(np.array(covered) > 0.03) > 0.5  # most photos have something in the way


# ---- one decoder: transparency and EXIF orientation, the same for every stage


def _encoded(image, fmt, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _cut_out_product() -> tuple[bytes, bytes]:
    """A red disc on a transparent background whose hidden colour is black, and the same on white."""
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((16, 16, 48, 48), fill=(200, 30, 40, 255))
    on_white = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(on_white).ellipse((16, 16, 48, 48), fill=(200, 30, 40))
    return _encoded(rgba, "PNG"), _encoded(on_white, "PNG")


def test_a_transparent_png_is_seen_on_white_by_every_stage():
    from moon.baseline.descriptor import image_descriptors
    from moon.config import load_config
    from moon.io.images import decode
    from moon.model.embedder import Embedder
    from moon.train.augment import augment

    transparent, on_white = _cut_out_product()
    assert decode(transparent).getpixel((0, 0)) == (255, 255, 255)
    np.testing.assert_array_equal(np.asarray(decode(transparent)), np.asarray(decode(on_white)))
    np.testing.assert_array_equal(image_descriptors([transparent]), image_descriptors([on_white]))  # baseline, distillation
    embedder = Embedder.create(load_config(None, TINY_MODEL).model, ["a red disc"], seed=0)
    inputs = [embedder.collate.patchify([image])[0] for image in (transparent, on_white)]  # the embedder's pixels
    np.testing.assert_array_equal(*inputs)
    seen = [np.asarray(augment(image, np.random.default_rng(3), 48)) for image in (transparent, on_white)]
    np.testing.assert_array_equal(*seen)  # augmentation


def test_a_jpeg_stored_sideways_is_seen_upright():
    from moon.baseline.descriptor import image_descriptors
    from moon.io.images import decode

    upright = Image.new("RGB", (64, 32), (200, 30, 40))
    ImageDraw.Draw(upright).rectangle((32, 0, 63, 31), fill=(30, 60, 200))  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    sideways = _encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    seen = decode(sideways)
    assert seen.size == (64, 32)
    left, right = np.asarray(seen)[16, 8].astype(int), np.asarray(seen)[16, 56].astype(int)
    assert left[0] > 150 > left[2] and right[2] > 150 > right[0]
    plain = _encoded(upright, "JPEG", quality=95)
    np.testing.assert_allclose(image_descriptors([sideways]), image_descriptors([plain]), atol=0.05)


def test_a_printed_motif_and_the_finish_change_the_product_not_the_background():
    plain = pixels(draw_item(look(pattern="solid"), SIZE))
    printed = pixels(draw_item(look(pattern="solid", motif=5), SIZE))
    other = pixels(draw_item(look(pattern="solid", motif=6), SIZE))
    inside = product_mask(draw_item(look(pattern="solid"), SIZE))
    for changed in (printed, other):
        differs = np.abs(changed - plain).max(axis=2) > 30
        assert differs.sum() > 0.03 * inside.sum() and not (differs & ~inside).any()
    assert np.abs(printed - other).max(axis=2).sum() > 0  # each motif is its own graphic

    crisp = pixels(draw_item(look(pattern="solid", finish=1.0), SIZE))
    faded = pixels(draw_item(look(pattern="solid", finish=-1.0), SIZE))
    assert (crisp[inside].max(axis=1) >= plain[inside].max(axis=1) - 1).all()  # a sheen only lightens
    assert crisp[inside].mean() > plain[inside].mean() + 3
    saturation = lambda a: (a.max(axis=1) - a.min(axis=1)).mean()  # noqa: E731
    assert saturation(faded[inside]) < saturation(plain[inside]) - 10  # a faded product loses its colour
    for changed in (crisp, faded):  # the background stays (only the product's antialiased edge may move)
        assert np.abs(changed - plain)[~inside].mean() < 1
