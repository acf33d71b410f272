"""Stage names, once: what a manifest's `stage` field says and the command that wrote it.

Every manifest writer and every reader that checks "is this the output of stage X" uses these
names; the CLI's command table names its commands with the same constants.
"""

from __future__ import annotations

CORPUS_PYDOC = "corpus pydoc"
TOKENIZER_TRAIN = "tokenizer train"
TOKENIZER_IMPORT = "tokenizer import"
"""A tokenizer dir that `convert from-hf` imported with an HF model (not trained here)."""
TOKENIZER_REPORT = "tokenizer report"
DATA_SHARD = "data shard"
PRETRAIN = "pretrain"
CONVERT_TO_HF = "convert to-hf"
CONVERT_FROM_HF = "convert from-hf"
CONVERT_FROM_GGUF = "convert from-gguf"
"""An HF dir dequantized from a Llama-family GGUF (an existing model as a base)."""
CONVERT_BASE = "convert base"
"""The base model of a pipeline as an HF dir: a packaged base, a GGUF file or an HF dir."""
CONVERT_TO_GGUF = "convert to-gguf"
"""One GGUF file (llama.cpp, Ollama, LM Studio) from an HF dir, an adapter merged first if given."""
FINETUNE_SFT = "finetune sft"
FINETUNE_MERGE = "finetune merge"
FINETUNE_DPO = "finetune dpo"
"""Preference tuning (DPO / IPO) of a model or of an SFT adapter on chosen/rejected pairs."""
INDEX_BUILD = "index build"
SERVE = "serve"
EVAL_QA = "eval qa"
EVAL_PPL = "eval ppl"
EVAL_RETRIEVAL = "eval retrieval"
EVAL_RAG_DATA = "eval rag-data"
"""SFT+RAG training data: QA train pairs with retrieved sources in their prompts."""
EVAL_PAIRS = "eval pairs"
"""Preference pairs from a model's own failures on QA train questions (chosen: the gold answer)."""
REPORT = "report"
COMPARE = "compare"

TOKENIZER_DIRS = (TOKENIZER_TRAIN, TOKENIZER_IMPORT)
"""Stages whose output is a tokenizer dir."""
CHECKPOINT_DIRS = (PRETRAIN, CONVERT_FROM_HF)
"""Stages whose output is a megatron checkpoint dir."""
HF_DIRS = (CONVERT_TO_HF, CONVERT_FROM_GGUF, CONVERT_BASE, FINETUNE_MERGE)
"""Stages whose output is an HF dir."""
