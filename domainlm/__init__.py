"""domainlm: build a domain-specific language model end to end.

The core package holds what every stage shares: the CLI (`domainlm.cli`), typed configs
(`domainlm.config`), stage manifests and output directories (`domainlm.manifest`), logging and
progress (`domainlm.progress`) and the pipeline runner (`domainlm.pipeline`). The stages are
subpackages mapped from the top-level folders: `domainlm.tokenizer` (tokenizer/),
`domainlm.pretrain` (pretrain/), `domainlm.finetune` (finetune/), `domainlm.serve` (serve/).
"""

__version__ = "0.1.0"


def _stages_beside_in_a_source_tree() -> None:
    """Imported straight from a source tree (its root on sys.path and no install: pytest from a copy
    of the repo, a bench script on the bare GPU machine), `domainlm/` holds only the core and the
    stage folders sit beside it: let `domainlm.pretrain` and the others resolve to them. A wheel or
    an editable install maps them itself; a wheel has no pyproject.toml beside the package."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if (os.path.isfile(os.path.join(root, "pyproject.toml"))
            and os.path.isfile(os.path.join(root, "pretrain", "__init__.py"))
            and not os.path.isdir(os.path.join(here, "pretrain")) and root not in __path__):
        __path__.append(root)


_stages_beside_in_a_source_tree()
