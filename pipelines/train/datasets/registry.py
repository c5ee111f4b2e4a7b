"""The registry of dataset layouts: each layout's module declares its ``LAYOUT``, and one entry here names it.

Detection tries the layouts in the order of :data:`LAYOUT_SPECS`; ``images-masks``, recognised by ``images/``
alone, comes last.
"""

from __future__ import annotations

import fsspec

from pipelines.train.datasets import images_masks, nyud, siftflow, voc
from pipelines.train.datasets.base import Layout

LAYOUT_SPECS: dict[str, Layout] = {
    "voc": voc.LAYOUT,
    "nyud": nyud.LAYOUT,
    "siftflow": siftflow.LAYOUT,
    "images-masks": images_masks.LAYOUT,
}
LAYOUTS: tuple[str, ...] = tuple(LAYOUT_SPECS)


def detect_layout(fs: fsspec.AbstractFileSystem, root: str, uri: str, forced: str | None) -> str:
    """The ``forced`` layout if the folders it needs are there, else the first layout whose folders are."""
    if forced is None:
        found = next((name for name, spec in LAYOUT_SPECS.items() if not missing_folders(fs, root, spec)), None)
        if found is None:
            folders = {name: ", ".join(f"{d}/" for d in spec.folders) for name, spec in LAYOUT_SPECS.items()}
            others = "; ".join(f"{name}: {folders[name]}" for name in LAYOUTS if name != "voc")
            raise ValueError(f"data {uri!r}: found neither the VOC layout ({folders['voc']}) nor another ({others})")
        return found
    if forced not in LAYOUT_SPECS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {forced!r}")
    if missing := missing_folders(fs, root, LAYOUT_SPECS[forced]):
        raise ValueError(f"data {uri!r} is not in the {forced} layout: missing {', '.join(missing)}")
    return forced


def missing_folders(fs: fsspec.AbstractFileSystem, root: str, spec: Layout) -> list[str]:
    """The folders of ``spec`` (as ``name/``) that are not under ``root``."""
    return [f"{folder}/" for folder in spec.folders if not fs.isdir(f"{root}/{folder}")]
