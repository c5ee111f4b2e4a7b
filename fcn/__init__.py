from fcn.models import (  # noqa: F401
    fcn8s_atonce_vgg16,
    fcn8s_vgg16,
    fcn16s_vgg16,
    fcn32s_alexnet,
    fcn32s_googlenet,
    fcn32s_vgg16,
    get_model,
)
from fcn.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint  # noqa: F401
from fcn.classes import VOC_CLASSES, voc_palette  # noqa: F401
from fcn.conventions import InputConvention, get_convention  # noqa: F401
from fcn.image import to_rgb_array  # noqa: F401
from fcn.losses import cross_entropy  # noqa: F401
from fcn.metrics import ConfusionMatrix  # noqa: F401
from fcn.predict import Prediction, Predictor, predict  # noqa: F401
