"""resclip-deploy: ResCLIP open-vocabulary segmentation, exported to ONNX and run without torch.

This package (the shared contract) imports numpy, scipy, OpenCV and click only; the torch side is
``resclip_deploy.export`` (install the ``[export]`` extra), the ONNX side
``resclip_deploy.runtime``.
"""

from .errors import UserError
from .params import PRESETS, ResCLIPParams
from .postprocess import Segmentation
from .vocab import Vocabulary

__version__ = "0.1.0"
__all__ = ["PRESETS", "ResCLIPParams", "Segmentation", "UserError", "Vocabulary", "__version__"]
