"""Fine-tuning and measuring: LoRA training and merging, the invoice data it trains on, evaluation, Dask batch
jobs."""
