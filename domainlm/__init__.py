"""domainlm: build a domain-specific language model end to end.

The core package holds what every stage shares: the CLI (`domainlm.cli`), typed configs
(`domainlm.config`), stage manifests and output directories (`domainlm.manifest`), logging and
progress (`domainlm.progress`) and the pipeline runner (`domainlm.pipeline`). The stages are
subpackages mapped from the top-level folders: `domainlm.tokenizer` (tokenizer/),
`domainlm.pretrain` (pretrain/), `domainlm.finetune` (finetune/), `domainlm.serve` (serve/).
"""

__version__ = "0.1.0"
