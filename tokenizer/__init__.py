"""domainlm.tokenizer: corpus reading, the embedded pydoc corpus, SentencePiece training with
Hugging Face export, tokenizer reports, and the Beam corpus -> shards pipeline."""
