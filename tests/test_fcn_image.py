"""to_rgb_array for every PIL mode and array layout the system meets, and clear errors for the rest."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.image import to_rgb_array

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, size=(5, 7), dtype=np.uint8)


def _roundtrip_png(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return Image.open(buffer)


def _check(out: np.ndarray, expected: np.ndarray) -> None:
    assert out.dtype == np.uint8 and out.shape == expected.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


def test_rgb_and_grey_modes() -> None:
    _check(to_rgb_array(Image.fromarray(RGB)), RGB)
    grey3 = np.repeat(GREY[:, :, None], 3, axis=2)
    _check(to_rgb_array(Image.fromarray(GREY)), grey3)
    bilevel = Image.fromarray(GREY).convert("1", dither=Image.Dither.NONE)
    _check(to_rgb_array(bilevel), np.repeat((GREY >= 128)[:, :, None] * 255, 3, 2).astype(np.uint8))


def test_palette_with_and_without_transparency() -> None:
    palette_image = Image.fromarray(RGB).quantize(colors=8)
    expected = np.asarray(palette_image.convert("RGB"))
    _check(to_rgb_array(palette_image), expected)
    transparent = palette_image.copy()
    transparent.info["transparency"] = 0  # palette index 0 is fully transparent
    transparent = _roundtrip_png(transparent)
    assert transparent.mode == "P" and "transparency" in transparent.info
    index = np.asarray(transparent)
    want = expected.copy()
    want[index == 0] = 255  # composited over white
    _check(to_rgb_array(transparent), want)


def test_alpha_is_composited_over_the_background() -> None:
    alpha = np.array([0, 255, 128], dtype=np.uint8)[np.arange(5 * 7).reshape(5, 7) % 3]
    rgba = np.dstack([RGB, alpha])
    a = alpha.astype(np.int64)[..., None]
    expected = (RGB * a + 255 * (255 - a) + 127) // 255
    _check(to_rgb_array(Image.fromarray(rgba)), expected.astype(np.uint8))
    _check(to_rgb_array(rgba), expected.astype(np.uint8))
    black = to_rgb_array(rgba, background=(0, 0, 0))
    np.testing.assert_array_equal(black[alpha == 0], 0)
    np.testing.assert_array_equal(black[alpha == 255], RGB[alpha == 255])
    la = Image.fromarray(np.dstack([GREY, alpha]))
    assert la.mode == "LA"
    grey_expected = (GREY * a[..., 0] + 255 * (255 - a[..., 0]) + 127) // 255
    _check(to_rgb_array(la), np.repeat(grey_expected[:, :, None], 3, 2).astype(np.uint8))


def test_cmyk_is_converted_to_what_the_inks_leave() -> None:
    """Each channel keeps the light that neither its ink nor black absorbs: (255 - C)(255 - K) / 255,
    computed here from the ink values, not by Pillow."""
    rng = np.random.default_rng(4)
    inks = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    cmyk = Image.frombytes("CMYK", (7, 5), inks.tobytes())
    light = 255.0 - inks[:, :, :3].astype(float)
    expected = light * (255.0 - inks[:, :, 3:].astype(float)) / 255.0
    got = to_rgb_array(cmyk).astype(float)
    assert got.shape == (5, 7, 3) and np.abs(got - expected).max() <= 1.0


def test_sixteen_bit_png_scales_to_eight_bits() -> None:
    values = np.array([[0, 257, 65535], [32896, 128, 65280]], dtype=np.uint16)
    image = _roundtrip_png(Image.fromarray(values))
    assert image.mode in ("I;16", "I")
    expected = np.array([[0, 1, 255], [128, 0, 254]], dtype=np.uint8)  # round(v / 257)
    _check(to_rgb_array(image), np.repeat(expected[:, :, None], 3, 2))
    _check(to_rgb_array(Image.fromarray(values.astype(np.int32))), np.repeat(expected[:, :, None], 3, 2))
    _check(to_rgb_array(values), np.repeat(expected[:, :, None], 3, 2))


def test_float_images_are_taken_in_unit_range() -> None:
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32)
    expected = np.repeat(np.array([[0, 128, 255, 255, 0]], dtype=np.uint8)[:, :, None], 3, 2)
    assert Image.fromarray(values).mode == "F"
    _check(to_rgb_array(Image.fromarray(values)), expected)
    _check(to_rgb_array(values.astype(np.float64)), expected)


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_array_layouts(channels: int | None) -> None:
    if channels is None:
        _check(to_rgb_array(GREY), np.repeat(GREY[:, :, None], 3, 2))
    elif channels == 1:
        _check(to_rgb_array(GREY[:, :, None]), np.repeat(GREY[:, :, None], 3, 2))
    else:
        _check(to_rgb_array(RGB[:, ::-1]), RGB[:, ::-1])  # a non-contiguous view comes out contiguous
    _check(to_rgb_array(np.ones((2, 2), dtype=bool)), np.full((2, 2, 3), 255, np.uint8))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 4, 5), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros((4, 4), np.int64), "dtype int64"),
        (np.full((2, 2), np.nan), "NaN"),
        ("image.png", "str"),
    ],
)
def test_bad_input_names_the_problem(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_rgb_array(bad)  # type: ignore[arg-type]


def test_input_conventions() -> None:
    from fcn.classes import VOC_CLASSES, voc_palette
    from fcn.conventions import get_convention

    pixel = np.array([[[10, 20, 30]]], dtype=np.uint8)  # R, G, B
    caffe = get_convention("caffe").to_tensor(pixel)
    assert caffe.shape == (3, 1, 1) and caffe.dtype == torch.float32
    assert caffe.flatten().tolist() == pytest.approx([30 - 104.00699, 20 - 116.66877, 10 - 122.67892])
    tv = get_convention("torchvision").to_tensor(pixel).flatten().tolist()
    assert tv == pytest.approx([(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225])
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for name in ("caffe", "torchvision"):  # channels_last: the same values, already a channels_last batch
        plain, nhwc = (get_convention(name).to_tensor(image, channels_last=last)[None] for last in (False, True))
        assert torch.equal(plain, nhwc) and plain.is_contiguous()
        assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    with pytest.raises(ValueError, match="'bgr'"):
        get_convention("bgr")
    with pytest.raises(ValueError, match="uint8"):
        get_convention("caffe").to_tensor(pixel.astype(np.float32))
    palette = voc_palette()
    assert len(VOC_CLASSES) == 21 and len(palette) == 768
    assert palette[3:6] == [128, 0, 0] and palette[15 * 3 : 16 * 3] == [192, 128, 128]  # aeroplane, person
    assert palette[255 * 3 :] == [224, 224, 192]
