"""The TIFF Orientation tag on the windowed path: a tiled TIFF's windows and georeferencing as displayed.

The whole-image path shows a TIFF as Pillow does, its Orientation applied (``PIL.ImageOps.exif_transpose``).
``pipelines.segment.tiff.WindowReader`` reads windows of that displayed image (``stored_window`` and
``displayed_pixels``), so the network sees the same pixels and the masks of tiled and whole images agree. GDAL (and
so QGIS) draws a GeoTIFF's stored rows and columns and ignores the tag: ``displayed_geotags`` georeferences a mask
drawn as displayed so that each of its pixels lies where the source's pixel does.
"""

from __future__ import annotations

import numpy as np
import tifffile

ORIENTATION_TAG = 274
"""TIFF Orientation (1-8, as EXIF's): how the stored rows and columns are shown."""
ORIENTATIONS = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}
"""Orientation -> (transposed, rows flipped, columns flipped): the displayed image is the stored one transposed,
then flipped."""
Orientation = tuple[bool, bool, bool]
_SCALE, _TIEPOINT, _TRANSFORMATION, _GEOKEYS = 33550, 33922, 34264, 34735
_RASTER_TYPE_KEY, _PIXEL_IS_POINT = 1025, 2


def page_orientation(page: tifffile.TiffPage) -> Orientation:
    """``ORIENTATIONS`` of ``page``'s Orientation tag; as stored when it is absent or not one of 1-8."""
    tag = page.tags.get(ORIENTATION_TAG)
    return ORIENTATIONS.get(int(tag.value) if tag is not None else 1, ORIENTATIONS[1])


def stored_window(
    y0: int, y1: int, x0: int, x1: int, height: int, width: int, orientation: Orientation
) -> tuple[int, int, int, int]:
    """The stored rows and columns ``(y0, y1, x0, x1)`` holding the window ``y0:y1, x0:x1`` of the displayed
    ``height`` x ``width`` image."""
    transposed, rows_flipped, columns_flipped = orientation
    if rows_flipped:
        y0, y1 = height - y1, height - y0
    if columns_flipped:
        x0, x1 = width - x1, width - x0
    return (x0, x1, y0, y1) if transposed else (y0, y1, x0, x1)


def displayed_pixels(window: np.ndarray, orientation: Orientation) -> np.ndarray:
    """The ``HxWxC`` stored ``window`` (from ``stored_window``) as displayed."""
    transposed, rows_flipped, columns_flipped = orientation
    if not any(orientation):
        return window
    window = window.transpose(1, 0, 2) if transposed else window
    return np.ascontiguousarray(window[:: -1 if rows_flipped else 1, :: -1 if columns_flipped else 1])


def displayed_geotags(geotags: list[tuple], height: int, width: int, orientation: Orientation) -> list[tuple]:
    """The GeoTIFF ``geotags`` (tifffile ``extratags``) of a source whose displayed image is ``height`` x ``width``,
    for a raster drawn as displayed: a ModelTransformation (the source's, or its tiepoint and pixel scale) composed
    with the displayed-to-stored pixel mapping, or tiepoints (ground control points) moved to displayed pixels."""
    tags = {tag[0]: tag for tag in geotags}
    if not any(orientation) or (_TRANSFORMATION not in tags and _TIEPOINT not in tags):
        return geotags
    keys = tags.get(_GEOKEYS, (0, 0, 0, ()))[3]
    point = any(tuple(keys[i : i + 4]) == (_RASTER_TYPE_KEY, 0, 1, _PIXEL_IS_POINT) for i in range(4, len(keys), 4))
    transposed, rows_flipped, columns_flipped = orientation
    # displayed (x, y) -> stored (x, y): flips in the displayed frame, then the transposition
    flip = np.array([[-1.0 if columns_flipped else 1.0, 0.0], [0.0, -1.0 if rows_flipped else 1.0]])
    shift = np.array([(width - point) * columns_flipped, (height - point) * rows_flipped], float)
    swap = np.array([[0.0, 1.0], [1.0, 0.0]]) if transposed else np.eye(2)
    to_stored = np.hstack([swap @ flip, (swap @ shift)[:, None]])
    kept = [tag for code, tag in tags.items() if code not in (_SCALE, _TIEPOINT, _TRANSFORMATION)]
    if _TRANSFORMATION in tags:
        matrix = np.array(tags[_TRANSFORMATION][3], float).reshape(4, 4)[:2, [0, 1, 3]]
    elif _SCALE in tags and len(tags[_TIEPOINT][3]) == 6:
        (i, j, _, x, y, _), (scale_x, scale_y, _) = tags[_TIEPOINT][3], tags[_SCALE][3]
        matrix = np.array([[scale_x, 0.0, x - i * scale_x], [0.0, -scale_y, y + j * scale_y]])
    else:  # ground control points: each tiepoint's stored pixel moved to where it is displayed
        points = np.array(tags[_TIEPOINT][3], float).reshape(-1, 6)
        inverse = np.linalg.inv(np.vstack([to_stored, [0.0, 0.0, 1.0]]))
        points[:, :2] = (inverse[:2, :2] @ points[:, :2].T).T + inverse[:2, 2]
        return [*kept, (_TIEPOINT, 12, points.size, tuple(points.ravel().tolist()), True)]
    composed = np.hstack([matrix[:, :2] @ to_stored[:, :2], (matrix[:, :2] @ to_stored[:, 2] + matrix[:, 2])[:, None]])
    (a, b, c), (d, e, f) = composed.tolist()
    transformation = (a, b, 0.0, c, d, e, 0.0, f, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    return [*kept, (_TRANSFORMATION, 12, 16, transformation, True)]
