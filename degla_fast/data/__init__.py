"""Training data: DeGLA JSON / CSV / WebDataset sources, K-negative batches, DALI or torch image pipelines.

Heavy dependencies (open_clip, nvidia.dali) load only when a pipeline is built.
"""
from .loader import Batch, TrainData, build_train_data
from .sources import Record, load_records
from .text import tokenize_captions, trim_tokens

__all__ = ["Batch", "TrainData", "build_train_data", "Record", "load_records", "tokenize_captions", "trim_tokens"]
