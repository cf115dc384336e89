"""electra-scale: pretrain ELECTRA text encoders at scale on DeepSpeed."""

__version__ = "0.1.0"
