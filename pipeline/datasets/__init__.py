"""Dataset readers for native on-disk layouts, and the one place they are registered."""

from __future__ import annotations

from pipeline.datasets.aircraft import AircraftReader
from pipeline.datasets.base import DatasetConfig, DatasetReader, Record, select_subset
from pipeline.datasets.cars import CarsReader
from pipeline.datasets.cub import CUBReader
from pipeline.datasets.digits import DigitsReader
from pipeline.datasets.dogs import DogsReader
from pipeline.datasets.flowers import FlowersReader
from pipeline.datasets.food import FoodReader
from pipeline.datasets.imagefolder import ImageFolderReader
from pipeline.datasets.imagenet import ImageNetReader
from pipeline.datasets.nabirds import NABirdsReader
from pipeline.datasets.pets import PetsReader
from pipeline.datasets.preprocess import Preprocessing, preprocess
from pipeline.errors import DatasetError, did_you_mean

#: reader name -> class. The one registry; add new readers here.
READERS: dict[str, type[DatasetReader]] = {
    "digits": DigitsReader,
    "imagefolder": ImageFolderReader,
    "imagenet": ImageNetReader,
    "cub": CUBReader,
    "cars": CarsReader,
    "aircraft": AircraftReader,
    "flowers": FlowersReader,
    "pets": PetsReader,
    "food": FoodReader,
    "dogs": DogsReader,
    "nabirds": NABirdsReader,
}


def open_dataset(cfg: DatasetConfig) -> DatasetReader:
    """Open the reader named in ``cfg`` and apply its subset options."""
    if cfg.reader not in READERS:
        raise DatasetError(
            f"unknown dataset reader {cfg.reader!r}{did_you_mean(cfg.reader, READERS)}; valid: {', '.join(sorted(READERS))}"
        )
    reader = READERS[cfg.reader](cfg.root, cfg.split, **dict(cfg.options))
    reader.records = select_subset(reader.records, reader.class_names, cfg)
    if not reader.records:
        raise DatasetError(f"dataset {cfg.reader!r} split {cfg.split!r} has no images after subsetting")
    return reader


__all__ = [
    "READERS",
    "DatasetConfig",
    "DatasetReader",
    "Preprocessing",
    "Record",
    "open_dataset",
    "preprocess",
]
