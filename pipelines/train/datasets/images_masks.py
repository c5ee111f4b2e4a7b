"""The generic images/masks layout: ``images/<key>.<jpg|jpeg|png|...>`` and ``masks/<key>.png`` (keys may
contain folders), optional ``train.txt`` / ``val.txt`` listing keys; without them every 10th key (by a hash
of the key, so adding files does not reshuffle the split) is validation.
"""

from __future__ import annotations

import hashlib

import fsspec

from pipelines.train.datasets.base import Layout, Sample, Splits

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGES_MASKS_VAL_EVERY = 10


def images_masks_splits(fs: fsspec.AbstractFileSystem, root: str) -> Splits:
    images = {}
    for path in fs.find(f"{root}/images"):
        stem, dot, suffix = path[len(root) + len("/images/") :].rpartition(".")
        if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES:
            images[stem] = fs.unstrip_protocol(path)
    masks = set()
    if fs.isdir(f"{root}/masks"):
        masks = {p[len(root) + len("/masks/") : -len(".png")] for p in fs.find(f"{root}/masks") if p.endswith(".png")}

    def sample(key: str, image: str) -> Sample:
        mask = fs.unstrip_protocol(f"{root}/masks/{key}.png") if key in masks else None
        return Sample(key, image, mask, "images-masks")

    samples = {key: sample(key, uri) for key, uri in sorted(images.items())}
    listed = [f"{root}/{name}.txt" for name in ("train", "val")]
    if all(fs.isfile(p) for p in listed):
        splits = []
        for listing in listed:
            with fs.open(listing, "r") as f:
                keys = [line.strip() for line in f.read().splitlines() if line.strip()]
            splits.append([samples.get(k) or sample(k, fs.unstrip_protocol(f"{root}/images/{k}")) for k in keys])
        return splits[0], splits[1]
    val_keys = {k for k in samples if int(hashlib.sha1(k.encode()).hexdigest(), 16) % IMAGES_MASKS_VAL_EVERY == 0}
    train = [s for k, s in samples.items() if k not in val_keys]
    val = [s for k, s in samples.items() if k in val_keys]
    return train, val


LAYOUT = Layout(("images",), images_masks_splits)  # recognised by images/ alone: the registry tries it last
