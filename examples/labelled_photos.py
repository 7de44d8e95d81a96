"""A small labelled query set from the 2k Kaggle fashion sample, for `moon ingest-queries`.

The "shopper photos" this script makes are SYNTHETIC: each is an image of the catalogue
itself, randomly cropped, maybe mirrored, turned a few degrees and colour-jittered with PIL.
They are derivatives of catalogue images, not photos taken by shoppers, so recall on them
says how well a model sees through these distortions, not how well it serves real image
search (a real shopper's photo shows another scene, light and angle). The set shows how
a labelled query set enters MOON; measure a model on real labelled photos.

Each photo's relevant item is the item it was made from. The output folder holds the
photos (`photos/<n>.jpg`) and `labelled.csv` with the columns query_image (a path
relative to the CSV), item_ids and split:

    python examples/labelled_photos.py ../shared/data/fashion-2k-kaggle runs/labelled-photos
    moon ingest ../shared/data/fashion-2k-kaggle --run-dir runs/fashion2k
    moon ingest-queries runs/labelled-photos/labelled.csv --run-dir runs/fashion2k
"""

from __future__ import annotations

import argparse
import csv
import io
import random
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from moon.io.images import decode

SYNTHETIC = ("synthetic shopper photos: catalogue images cropped, flipped, rotated and colour-jittered "
             "with PIL, not real shoppers' photos")


def shopper_photo(image: Image.Image, rng: random.Random) -> Image.Image:
    """One synthetic "shopper photo" of a catalogue image: a random crop, flip, small rotation and colour jitter."""
    photo = _random_crop(image, rng)
    if rng.random() < 0.5:
        photo = ImageOps.mirror(photo)
    background = tuple(rng.randint(200, 250) for _ in range(3))  # what the turned corners show
    photo = photo.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, expand=False, fillcolor=background)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        photo = enhance(photo).enhance(rng.uniform(0.7, 1.3))
    return photo


def _random_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    """60-95% of the area, the aspect ratio a little changed, anywhere in the image."""
    width, height = image.size
    area = rng.uniform(0.6, 0.95) * width * height
    aspect = rng.uniform(0.8, 1.25)
    crop_w = min(width, round((area * aspect) ** 0.5))
    crop_h = min(height, round((area / aspect) ** 0.5))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    return image.crop((left, top, left + crop_w, top + crop_h))


def catalogue_items(data: Path) -> list[str]:
    """Ids of the sample's items that have an image file, in styles.csv order."""
    with open(data / "styles.csv", newline="", encoding="utf-8-sig") as handle:
        ids = [row["id"].strip() for row in csv.DictReader(handle)]
    return [item for item in ids if (data / "images" / f"{item}.jpg").is_file()]


def build(data: Path, out: Path, queries: int, test_share: float, seed: int) -> Path:
    """Writes `queries` synthetic photos of random items and the labelled CSV; returns the CSV's path."""
    rng = random.Random(seed)
    items = catalogue_items(data)
    if not items:
        raise SystemExit(f"{data} has no styles.csv items with images/<id>.jpg: pass the Kaggle sample's folder")
    chosen = rng.sample(items, min(queries, len(items)))
    (out / "photos").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, item in enumerate(chosen):
        with open(data / "images" / f"{item}.jpg", "rb") as handle:
            photo = shopper_photo(decode(handle.read()), rng)
        name = f"photos/{n:05d}.jpg"
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=rng.randint(80, 95))
        (out / name).write_bytes(buffer.getvalue())
        rows.append({"query_image": name, "item_ids": item, "split": "test" if rng.random() < test_share else "train"})
    path = out / "labelled.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["query_image", "item_ids", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the Kaggle sample: a folder with styles.csv and images/<id>.jpg")
    parser.add_argument("out", type=Path, help="output folder for photos/ and labelled.csv")
    parser.add_argument("--queries", type=int, default=200, help="photos to make, one item each (default 200)")
    parser.add_argument("--test-share", type=float, default=0.5, help="share of queries in the test split (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the item choice and the distortions")
    args = parser.parse_args(argv)
    path = build(args.data, args.out, args.queries, args.test_share, args.seed)
    with open(path, newline="") as handle:
        splits = [row["split"] for row in csv.DictReader(handle)]
    print(f"wrote {len(splits)} {SYNTHETIC} ({splits.count('train')} train, {splits.count('test')} test)")
    print(f"labelled set: {path}; ingest it with `moon ingest-queries {path} --run-dir RUN` after `moon ingest {args.data}`")


if __name__ == "__main__":
    main()
