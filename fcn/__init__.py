from fcn.models import fcn8s_atonce_vgg16, fcn8s_vgg16, fcn16s_vgg16, fcn32s_vgg16, get_model  # noqa: F401
