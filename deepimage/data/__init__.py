"""Data: index image folders, CSVs and tar shards, decode robustly, prepare sharded stores."""

from deepimage.data.cache import store_for
from deepimage.data.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    ResizeMode,
    decode_image,
    open_image,
    resize_array,
    resize_image,
)
from deepimage.data.index import (
    IMAGE_EXTENSIONS,
    DataError,
    DatasetIndex,
    Sample,
    load_index,
    read_class_names,
    read_manifest,
    scan_folder,
    scan_tars,
    split_index,
)
from deepimage.data.prepare import prepare_store
from deepimage.data.store import CorruptShardError, IncompleteStoreError, Store

__all__ = [
    "CorruptShardError",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DataError",
    "DatasetIndex",
    "DecodeError",
    "IncompleteStoreError",
    "ResizeMode",
    "Sample",
    "Store",
    "decode_image",
    "load_index",
    "open_image",
    "prepare_store",
    "read_class_names",
    "read_manifest",
    "resize_array",
    "resize_image",
    "scan_folder",
    "scan_tars",
    "split_index",
    "store_for",
]
