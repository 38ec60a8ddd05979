"""cxr_model: a standalone chest-radiograph classifier (MONAI DenseNet121, 14 ChestX-ray14 findings).

Inputs are 2-D float arrays in [0, 1] (1 = brightest displayed); DICOM
decoding happens elsewhere.  CAMs for every finding come from one forward pass.
"""

from .card import ModelCard, load_card
from .errors import ImageRefused, ModelError
from .image_io import load_image_file
from .labels import FINDINGS
from .metadata import ImageMetadata, metadata_from_dicom
from .model import Model, Prediction, load_model
from .paths import bundled_demo_path

__all__ = [
    "FINDINGS",
    "ImageMetadata",
    "ImageRefused",
    "Model",
    "ModelCard",
    "ModelError",
    "Prediction",
    "bundled_demo_path",
    "load_card",
    "load_image_file",
    "load_model",
    "metadata_from_dicom",
]
