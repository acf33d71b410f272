"""`domainlm convert to-hf / from-hf`: megatron-core checkpoints <-> Hugging Face Llama."""
