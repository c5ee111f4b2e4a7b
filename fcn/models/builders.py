"""The VGG16 FCNs of the paper's three datasets: short builders over ``build_fcn``.

PASCAL VOC: FCN-32s, 16s, 8s (staged and at-once), and FCN-4s / FCN-2s continuing the skips to pool2
and pool1. NYUDv2: RGB-D (early fusion), HHA, RGB-HHA (late fusion) at 32s and 16s. SIFT Flow:
semantic (33 classes) and geometric (3) heads on one trunk at 32s, 16s and 8s.
"""

from __future__ import annotations

from fcn.models.fcn import FCN, build_fcn
from fcn.models.head import SKIP_ORDER
from fcn.models.networks import register_model
from fcn.models.vgg import VGG16Trunk

AT_ONCE_SCALES = {"pool4": 0.01, "pool3": 0.0001}
"""Caffe's voc-fcn8s-atonce scales pool4 and pool3 before scoring them (trained in one stage)."""
SKIPS = {32: (), 16: SKIP_ORDER[:1], 8: SKIP_ORDER[:2], 4: SKIP_ORDER[:3], 2: SKIP_ORDER[:4]}
"""Skips of FCN-<n>s: the head's finest fusion is at stride n."""
VOC_CLASSES, NYUD_CLASSES, SIFTFLOW_CLASSES, SIFTFLOW_GEOMETRIC_CLASSES = 21, 40, 33, 3
RGB_HHA = {"rgb": ("rgb",), "hha": ("hha",)}


@register_model(paper_lr=1e-10)
def fcn32s_vgg16(
    *,
    num_classes: int = VOC_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """FCN-32s on VGG16; ``backbone_weights``: a torchvision VGG16 state_dict (path or fsspec URI)."""
    return build_fcn("fcn32s_vgg16", VGG16Trunk, **_arguments(locals()), skips=SKIPS[32])


@register_model(paper_lr=1e-12)
def fcn16s_vgg16(
    *,
    num_classes: int = VOC_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """FCN-16s on VGG16: FCN-32s's scores fused with a pool4 prediction."""
    return build_fcn("fcn16s_vgg16", VGG16Trunk, **_arguments(locals()), skips=SKIPS[16])


@register_model(paper_lr=1e-14)
def fcn8s_vgg16(
    *,
    num_classes: int = VOC_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """FCN-8s on VGG16: FCN-16s fused again with a pool3 prediction."""
    return build_fcn("fcn8s_vgg16", VGG16Trunk, **_arguments(locals()), skips=SKIPS[8])


@register_model(paper_lr=1e-10)
def fcn8s_atonce_vgg16(
    *,
    num_classes: int = VOC_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """FCN-8s trained at once (pool4 x 0.01, pool3 x 1e-4 before scoring) on VGG16."""
    return build_fcn(
        "fcn8s_atonce_vgg16", VGG16Trunk, **_arguments(locals()), skips=SKIPS[8], skip_scales=AT_ONCE_SCALES
    )


@register_model()
def fcn4s_vgg16(
    *,
    num_classes: int = VOC_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """FCN-4s: the skip architecture continued to pool2 (beyond the paper, for thin structures)."""
    return build_fcn("fcn4s_vgg16", VGG16Trunk, **_arguments(locals()), skips=SKIPS[4])


@register_model()
def fcn2s_vgg16(
    *,
    num_classes: int = VOC_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """FCN-2s: the skip architecture continued to pool1."""
    return build_fcn("fcn2s_vgg16", VGG16Trunk, **_arguments(locals()), skips=SKIPS[2])


@register_model(modalities=("rgb", "depth"))
def fcn32s_rgbd_vgg16(
    *,
    num_classes: int = NYUD_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """NYUDv2 RGB-D, early fusion: one stream on RGB plus centred log depth (conv1_1 takes 4 channels;
    from RGB weights, the depth channel's filters start as the mean of the RGB filters)."""
    return build_fcn("fcn32s_rgbd_vgg16", VGG16Trunk, **_arguments(locals()), streams={"rgbd": ("rgb", "depth")})


@register_model(paper_lr=1e-10, modalities=("hha",))
def fcn32s_hha_vgg16(
    *,
    num_classes: int = NYUD_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """NYUDv2 HHA: a single stream on the HHA encoding of depth."""
    return build_fcn("fcn32s_hha_vgg16", VGG16Trunk, **_arguments(locals()), streams={"hha": ("hha",)})


@register_model(paper_lr=1e-12, modalities=("rgb", "hha"))
def fcn32s_rgbhha_vgg16(
    *,
    num_classes: int = NYUD_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """NYUDv2 RGB-HHA, late fusion: a colour and an HHA stream, scores averaged 0.5/0.5."""
    return build_fcn("fcn32s_rgbhha_vgg16", VGG16Trunk, **_arguments(locals()), streams=RGB_HHA)


@register_model(modalities=("rgb", "hha"))
def fcn16s_rgbhha_vgg16(
    *,
    num_classes: int = NYUD_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """NYUDv2 RGB-HHA FCN-16s (the paper's best NYUDv2 net): each stream with its own pool4 skip."""
    return build_fcn("fcn16s_rgbhha_vgg16", VGG16Trunk, **_arguments(locals()), skips=SKIPS[16], streams=RGB_HHA)


@register_model(paper_lr=1e-10)
def fcn32s_siftflow_vgg16(
    *,
    num_classes: int = SIFTFLOW_CLASSES,
    geometric_classes: int = SIFTFLOW_GEOMETRIC_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """SIFT Flow FCN-32s: semantic and geometric heads on one trunk."""
    return build_fcn(
        "fcn32s_siftflow_vgg16", VGG16Trunk, **_arguments(locals()), extra_heads={"geometric": geometric_classes}
    )


@register_model(paper_lr=1e-12)
def fcn16s_siftflow_vgg16(
    *,
    num_classes: int = SIFTFLOW_CLASSES,
    geometric_classes: int = SIFTFLOW_GEOMETRIC_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """SIFT Flow FCN-16s (the paper's Table 5 net): each head with its own pool4 skip."""
    return build_fcn(
        "fcn16s_siftflow_vgg16",
        VGG16Trunk,
        **_arguments(locals()),
        skips=SKIPS[16],
        extra_heads={"geometric": geometric_classes},
    )


@register_model()
def fcn8s_siftflow_vgg16(
    *,
    num_classes: int = SIFTFLOW_CLASSES,
    geometric_classes: int = SIFTFLOW_GEOMETRIC_CLASSES,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """SIFT Flow FCN-8s: each head with its own pool4 and pool3 skips."""
    return build_fcn(
        "fcn8s_siftflow_vgg16",
        VGG16Trunk,
        **_arguments(locals()),
        skips=SKIPS[8],
        extra_heads={"geometric": geometric_classes},
    )


def _arguments(builder_locals: dict) -> dict:
    """The arguments every builder passes on to ``build_fcn``."""
    names = ("num_classes", "geometry", "width", "backbone_weights", "output_stride", "learnable_upsampling")
    return {name: builder_locals[name] for name in names}
