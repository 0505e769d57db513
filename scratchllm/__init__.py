"""scratchllm: a large language model built from scratch, from bytes to a chat server."""

__version__ = "0.1.0"
