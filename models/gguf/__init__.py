"""Reading llama.cpp's GGUF files: the header, the tokenizer, and the quantized blocks kept exactly."""
