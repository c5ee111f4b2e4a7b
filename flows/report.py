"""Run reports: a markdown summary for Prefect artifacts and a self-contained HTML page.

The HTML report (written to ``<output>/report.html``) has a class-distribution bar chart as inline SVG
and a gallery of image / mask overlays as base64 PNG thumbnails (``flows.gallery``): no scripts, no external
assets.
The figures come from the statistics' digest (``flows.digest.digest_stats``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import fsspec

from flows.digest import ClassDistribution
from flows.gallery import GalleryItem


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
        "<figure>"
        + (f'<img src="{item.data_uri}" alt="{esc(item.image_uri)}">' if item.data_uri else "")
        + f"<figcaption>{esc(item.caption)}</figcaption></figure>"
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
