"""Data: one reader per source, protocols, TFRecord shards and tf.data pipelines."""

from caaxr_tf.data.records import Box, InputError, ReadResult, Sample, SchemaError, Skipped

__all__ = ["Box", "InputError", "ReadResult", "Sample", "SchemaError", "Skipped"]
