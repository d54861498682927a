"""The engine: a model folder loaded into onnxruntime, and generation on it (decoding, the KV cache and its
scheduler, sampling, stop strings, detokenizing, JSON constraints, prefix reuse, chat templates)."""
