"""deit: DeiT image classification — inference, distillation training, evaluation, deployment.

Public API (everything else is reachable through its module):

    >>> import deit
    >>> clf = deit.Classifier.from_pretrained("fashion-mnist")
    >>> clf.predict("shoe.png", top_k=3)
"""

from deit.checkpoints import LoadedModel, load_model
from deit.config import VARIANTS, DeiTConfig
from deit.errors import CheckpointError, DeiTError, ImageLoadError
from deit.images import load_image
from deit.inference import Classifier, FileResult, Prediction
from deit.model import DeiT, DeiTOutput
from deit.saving import convert, save_model
from deit.transforms import PreprocessConfig, preprocess

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "Classifier",
    "DeiT",
    "DeiTConfig",
    "DeiTError",
    "DeiTOutput",
    "FileResult",
    "ImageLoadError",
    "LoadedModel",
    "Prediction",
    "PreprocessConfig",
    "convert",
    "load_image",
    "load_model",
    "preprocess",
    "save_model",
]
