"""Run reports: a markdown summary for Prefect artifacts and a self-contained HTML page.

The HTML report (written to ``<output>/report.html``) has a class-distribution bar chart as inline SVG
and a gallery of image / mask overlays as base64 PNG thumbnails: no scripts, no external assets. An image
segmented by windows is shown from its mask's overview page and a matching reduced view of the source, never
decoded at full resolution.
The figures come from the statistics' digest (``flows.digest.digest_stats``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import tifffile
from PIL import Image

from flows.digest import ClassDistribution
from pipelines.common.decode import decode_image
from pipelines.segment.masks import encode_overlay
from pipelines.segment.tiff import HEADER_BLOCK_BYTES, OVERVIEW_SIDE, WindowReader, may_be_tiff

THUMBNAIL_SIZE = 160


@dataclass(frozen=True)
class GalleryItem:
    """One image with its mask blended on top, as a PNG data URI."""

    image_uri: str
    caption: str
    data_uri: str


@dataclass(frozen=True)
class RunReport:
    """Everything a person wants to know about one segmentation run."""

    title: str
    model: str
    ok: int
    error: int
    skipped: int
    images_per_second: float  # steady state
    startup_s: float  # Ray start-up and model loading, before the first segmented batch
    distribution: ClassDistribution
    palette: list[int]
    links: dict[str, str] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)
    further_heads: dict[str, tuple[ClassDistribution, list[int]]] = field(default_factory=dict)
    """A multi-head model's further heads: each one's class distribution and palette."""

    @property
    def status(self) -> str:
        return "failed" if self.ok == 0 and self.error > 0 else ("partial" if self.error else "ok")


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "0.0%"


def markdown_summary(report: RunReport) -> str:
    """Markdown for ``prefect.artifacts.create_markdown_artifact``: counts, throughput, model, the
    class-distribution table (classes with any pixels) and links to the outputs."""
    dist = report.distribution
    lines = [
        f"# {report.title}",
        "",
        "| status | images |",
        "|---|---:|",
        f"| ok | {report.ok} |",
        f"| error | {report.error} |",
        f"| skipped (already done) | {report.skipped} |",
        "",
        f"**Throughput:** {report.images_per_second:.2f} images/s steady state, "
        f"after {report.startup_s:.1f} s of start-up  ",
        f"**Model:** `{report.model}`",
        "",
    ]
    headed = [("Class distribution", dist)] + [
        (f"Class distribution: {head} head", d) for head, (d, _) in report.further_heads.items()
    ]
    for heading, dist in headed:
        lines += [f"## {heading}", "", "| class | pixels | share | images dominated |", "|---|---:|---:|---:|"]
        for name, pixels, dominant in zip(dist.class_names, dist.pixels, dist.dominant_images, strict=True):
            if pixels or dominant:
                lines.append(f"| {name} | {pixels} | {_percent(pixels, dist.total_pixels)} | {dominant} |")
        lines.append("")
    lines.pop()
    if report.links:
        lines += ["", "## Outputs", ""]
        lines += [f"- {name}: [{uri}]({uri})" for name, uri in report.links.items()]
    if report.errors:
        lines += ["", "## Errors (first rows)", "", "| image | reason |", "|---|---|"]
        lines += [f"| `{uri}` | {reason.replace('|', '/')} |" for uri, reason in report.errors]
    return "\n".join(lines) + "\n"


def _colour(palette: list[int], index: int) -> str:
    r, g, b = (palette[3 * index : 3 * index + 3] + [128, 128, 128])[:3]
    return f"#{r:02x}{g:02x}{b:02x}"


def class_chart_svg(dist: ClassDistribution, palette: list[int]) -> str:
    """Horizontal bar chart of the pixel share of each class present, as an inline SVG element."""
    rows = [(i, p) for i, p in enumerate(dist.pixels) if p]
    bar_height, gap, label_width, bar_width = 18, 6, 140, 420
    height = max(1, len(rows)) * (bar_height + gap) + gap
    biggest = max((p for _, p in rows), default=1)
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{label_width + bar_width + 80}" '
        f'height="{height}" role="img" aria-label="class distribution">'
    ]
    for row, (index, pixels) in enumerate(rows):
        y = gap + row * (bar_height + gap)
        width = max(1, round(bar_width * pixels / biggest))
        name = html.escape(dist.class_names[index])
        share = _percent(pixels, dist.total_pixels)
        parts.append(
            f'<text x="{label_width - 6}" y="{y + bar_height - 4}" text-anchor="end">{name}</text>'
            f'<rect class="bar" x="{label_width}" y="{y}" width="{width}" height="{bar_height}" '
            f'fill="{_colour(palette, index)}" stroke="#333"><title>{name}: {pixels} px</title></rect>'
            f'<text x="{label_width + width + 6}" y="{y + bar_height - 4}">{share}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def overlay_thumbnail(
    image_uri: str,
    mask_uri: str,
    pixels: int,
    palette: list[int],
    *,
    size: int = THUMBNAIL_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """The image (as displayed; ``pixels`` = its width x height) and the same colour overlay as the
    job's ``--overlays``, side by side, scaled so that the longer side is ``size`` px, as a PNG data URI."""
    with fsspec.open(image_uri, "rb", **(storage_options or {})) as f:
        rgb = decode_image(f.read(), max_pixels=pixels)
    with fsspec.open(mask_uri, "rb", **(storage_options or {})) as f:
        labels = np.asarray(Image.open(io.BytesIO(f.read())))
    return _side_by_side(rgb, labels, palette, size)


def overview_thumbnail(
    image_uri: str,
    mask_uri: str,
    palette: list[int],
    *,
    size: int = THUMBNAIL_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """``overlay_thumbnail`` of an image segmented by windows (a tiled TIFF; its mask a tiled TIFF with an overview
    page), from the mask's overview (``mask_overview``) and the source at the same scale: every n-th pixel
    (``WindowReader.read_decimated``) of the smallest tiled level of its pyramid at least as large, the full
    resolution when it has no pyramid. Memory: the overview, the view and one band of tiles, whatever the size."""
    labels = mask_overview(mask_uri, storage_options)
    height, width = labels.shape
    with WindowReader(image_uri, storage_options or {}) as reader:
        large_enough = [
            (layout.pixels, i, layout)
            for i, layout in enumerate(reader.levels)
            if layout and layout.height >= height and layout.width >= width
        ]
        _, level, layout = min(large_enough, default=(0, 0, reader.layout))
        rgb = reader.read_decimated(max(1, min(layout.height // height, layout.width // width)), level=level)
    if rgb.shape[:2] != labels.shape:
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))
    return _side_by_side(rgb, labels, palette, size)


def mask_overview(mask_uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """The labels of the smallest page of the TIFF mask at ``mask_uri`` (its overview), reading only the pages'
    headers and that page's pixels; ValueError if it has more than ``OVERVIEW_SIDE`` squared pixels."""
    fs, path = fsspec.core.url_to_fs(mask_uri, **(storage_options or {}))
    with fs.open(path, "rb", block_size=HEADER_BLOCK_BYTES, cache_type="readahead") as f, tifffile.TiffFile(f) as mask:
        overview = min(mask.pages, key=lambda page: math.prod(page.shape))
        if math.prod(overview.shape) > OVERVIEW_SIDE**2:
            raise ValueError(f"mask {mask_uri} has no overview page of at most {OVERVIEW_SIDE} px a side")
        return overview.asarray()


def _side_by_side(rgb: np.ndarray, labels: np.ndarray, palette: list[int], size: int) -> str:
    """``rgb`` and its overlay with ``labels``, the longer side scaled to ``size`` px, as a PNG data URI."""
    overlay = Image.open(io.BytesIO(encode_overlay(rgb, labels, palette)))
    image = Image.fromarray(rgb)
    scale = size / max(image.size)
    fitted = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pair = Image.new("RGB", (2 * fitted[0] + 4, fitted[1]), "white")
    pair.paste(image.resize(fitted, Image.Resampling.BILINEAR), (0, 0))
    pair.paste(overlay.resize(fitted, Image.Resampling.BILINEAR), (fitted[0] + 4, 0))
    buffer = io.BytesIO()
    pair.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery(
    sample: list[dict[str, Any]],
    class_names: list[str],
    palette: list[int],
    storage_options: dict[str, Any] | None = None,
) -> list[GalleryItem]:
    """Overlays of the ``sample`` rows (``StatsDigest.sample``), in their order."""
    items = []
    for row in sample:
        caption = (
            f"{row['image_uri'].rsplit('/', 1)[-1]} ({row['width']}x{row['height']}, "
            f"mostly {class_names[row['dominant_class']]})"
        )
        if may_be_tiff(row["mask_uri"]):  # the mask of an image segmented by windows (others are PNG)
            thumbnail = overview_thumbnail(row["image_uri"], row["mask_uri"], palette, storage_options=storage_options)
        else:
            thumbnail = overlay_thumbnail(
                row["image_uri"],
                row["mask_uri"],
                row["width"] * row["height"],
                palette,
                storage_options=storage_options,
            )
        items.append(GalleryItem(row["image_uri"], caption, thumbnail))
    return items


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}
.chart text{font-size:12px;dominant-baseline:auto}
.gallery{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;max-width:340px}figcaption{font-size:12px;word-break:break-all}
"""


def _relative(uri: str, report_uri: str) -> str:
    """``uri`` relative to the report's folder when it lies below it (links work wherever the output is
    browsed, e.g. a local folder or a static website bucket), else ``uri`` itself."""
    base = report_uri.rsplit("/", 1)[0] + "/"
    return uri[len(base) :] or "." if report_uri and uri.startswith(base) else uri


def html_report(report: RunReport, gallery: list[GalleryItem]) -> str:
    """A self-contained HTML page: counts, the class chart, the overlay gallery and output links."""
    esc = html.escape
    heads = [("Class distribution", report.distribution, report.palette)] + [
        (f"Class distribution: {esc(head)} head", dist, palette)
        for head, (dist, palette) in report.further_heads.items()
    ]
    distributions = "".join(
        f"<h2>{heading}</h2>\n{class_chart_svg(dist, palette)}\n"
        "<table><tr><th>class</th><th>pixels</th><th>share</th><th>images dominated</th></tr>"
        + "".join(
            f"<tr><td>{esc(name)}</td><td>{pixels}</td><td>{_percent(pixels, dist.total_pixels)}</td>"
            f"<td>{dominant}</td></tr>"
            for name, pixels, dominant in zip(dist.class_names, dist.pixels, dist.dominant_images, strict=True)
            if pixels or dominant
        )
        + "</table>\n"
        for heading, dist, palette in heads
    )
    figures = "".join(
        f'<figure><img src="{item.data_uri}" alt="{esc(item.image_uri)}">'
        f"<figcaption>{esc(item.caption)}</figcaption></figure>"
        for item in gallery
    )
    links = "".join(
        f'<li>{esc(name)}: <a href="{esc(_relative(uri, report.links.get("HTML report", "")))}">{esc(uri)}</a></li>'
        for name, uri in report.links.items()
    )
    errors = "".join(f"<tr><td>{esc(uri)}</td><td>{esc(reason)}</td></tr>" for uri, reason in report.errors)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(report.title)}</title><style>{_CSS}</style></head>
<body>
<h1>{esc(report.title)}</h1>
<p>Model <code>{esc(report.model)}</code> &middot; {report.images_per_second:.2f} images/s steady state
(start-up {report.startup_s:.1f} s)</p>
<table><tr><th>status</th><th>images</th></tr>
<tr><td>ok</td><td>{report.ok}</td></tr><tr><td>error</td><td>{report.error}</td></tr>
<tr><td>skipped (already done)</td><td>{report.skipped}</td></tr></table>
{distributions}<h2>Gallery: {len(gallery)} sample images (image | mask overlay)</h2>
<div class="gallery">{figures}</div>
{f"<h2>Errors (first rows)</h2><table><tr><th>image</th><th>reason</th></tr>{errors}</table>" if errors else ""}
<h2>Outputs</h2><ul>{links}</ul>
</body></html>
"""


def write_text(uri: str, text: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``text`` to any fsspec URI and return the URI."""
    with fsspec.open(uri, "w", encoding="utf-8", **(storage_options or {})) as f:
        f.write(text)
    return uri
