"""Turning a source (a GGUF, a Hugging Face folder) into a built model folder: the fused graph, its quantized
weights, optimum's export for the rest."""
