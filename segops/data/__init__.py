"""Datasets and augmentations: the built-in synthetic scribble dataset, PASCAL VOC / ScribbleSup folder
loaders, weak labels synthesized from full masks (scribbles, clicks, image tags), and aligned training
augmentations."""

from segops.data.scribbles import (
    connected_components,
    distance_to_boundary,
    image_tags,
    synthesize_clicks,
    synthesize_scribbles,
)
from segops.data.synthetic import SYNTHETIC_CLASSES, SyntheticScribbles, render_sample

__all__ = [
    "SyntheticScribbles",
    "SYNTHETIC_CLASSES",
    "render_sample",
    "synthesize_scribbles",
    "synthesize_clicks",
    "image_tags",
    "distance_to_boundary",
    "connected_components",
]

from segops.data.transforms import AugmentedDataset, CenterPad, RandomScaleCropFlip  # noqa: E402
from segops.data.voc import (  # noqa: E402
    VOC_CLASSES,
    DatasetError,
    VOCSegmentation,
    read_image,
    read_label_png,
    voc_palette,
)

__all__ += [
    "AugmentedDataset",
    "CenterPad",
    "RandomScaleCropFlip",
    "VOCSegmentation",
    "VOC_CLASSES",
    "DatasetError",
    "read_image",
    "read_label_png",
    "voc_palette",
]
