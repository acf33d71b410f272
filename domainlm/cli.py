"""The one CLI: `domainlm <stage> <command> [--config FILE] [--field.name=value ...]`.

Commands are listed once, in COMMANDS, by import path, so `domainlm --help` loads only the
light config modules and a command imports its stage (torch, Beam, megatron-core) when it runs.
A command with a config class gets one flag per config field; its run function takes the
resolved config. A `UserError` prints one line and exits 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import inspect
from dataclasses import dataclass
from typing import Any

from domainlm import __version__, stages
from domainlm.config import add_config_arguments, config_from_args, dump_yaml, normalize_argv
from domainlm.errors import UserError


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    """Words after `domainlm`, e.g. 'tokenizer train'."""
    help: str
    """One line for the parent's --help."""
    run: str
    """'module:function' called with the resolved config (or the argparse namespace)."""
    config: str | None = None
    """'module:Class' of the stage config; None for commands with hand-written arguments."""
    arguments: str | None = None
    """'module:function(parser)' adding hand-written arguments, for commands without a config."""
    inputs: str | None = None
    """'module:function(cfg)' describing the inputs as the manifest records them; lets
    `domainlm run` tell when the stage's output is up to date."""
    description: str = ""
    """Longer text for the command's own --help (the config class docstring when empty)."""


COMMANDS: list[Command] = [
    Command(
        stages.CORPUS_PYDOC, "build the embedded domain corpus from installed packages' API docs",
        run="domainlm.data.pydoc:build", config="domainlm.data.config:PydocConfig",
        inputs="domainlm.data.pydoc:inputs",
    ),
    Command(
        stages.TOKENIZER_TRAIN, "train a SentencePiece tokenizer and export it for Hugging Face",
        run="domainlm.tokenizer.train:train", config="domainlm.tokenizer.config:TokenizerConfig",
        inputs="domainlm.tokenizer.train:inputs",
    ),
    Command(
        stages.TOKENIZER_REPORT, "bytes per token, tokens per word and byte fallback on held-out text",
        run="domainlm.tokenizer.report:report", config="domainlm.tokenizer.config:ReportConfig",
    ),
    Command(
        stages.DATA_SHARD, "clean, deduplicate and tokenize a corpus into WebDataset shards (Apache Beam)",
        run="domainlm.data.shard:shard", config="domainlm.data.config:ShardConfig",
        inputs="domainlm.data.shard:inputs",
    ),
    Command(
        stages.PRETRAIN, "pretrain a Llama-style GPT on megatron-core (one process per rank under torchrun)",
        run="domainlm.pretrain.trainer:main", config="domainlm.pretrain.config:PretrainConfig",
        inputs="domainlm.pretrain.config:inputs",
    ),
    Command(
        "launch pretrain", "print and run the torchrun / Slurm command of `domainlm pretrain` on N nodes x G GPUs",
        run="domainlm.launch.command:launch_pretrain", arguments="domainlm.launch.command:add_arguments",
    ),
    Command(
        "launch finetune", "print and run the torchrun / Slurm command of `domainlm finetune sft` on N nodes x G GPUs",
        run="domainlm.launch.command:launch_finetune", arguments="domainlm.launch.command:add_arguments",
    ),
    Command(
        stages.CONVERT_TO_HF, "megatron checkpoint (any TP/PP layout) -> Hugging Face LlamaForCausalLM, verified by logits",
        run="domainlm.pretrain.convert.command:to_hf", config="domainlm.pretrain.convert.config:ConvertToHFConfig",
        inputs="domainlm.pretrain.convert.command:inputs_to_hf",
    ),
    Command(
        stages.CONVERT_FROM_HF, "Hugging Face Llama / Mistral -> megatron checkpoint to continue pretraining from",
        run="domainlm.pretrain.convert.command:from_hf", config="domainlm.pretrain.convert.config:ConvertFromHFConfig",
        inputs="domainlm.pretrain.convert.command:inputs_from_hf",
    ),
    Command(
        stages.CONVERT_FROM_GGUF, "Llama-family GGUF (llama.cpp) -> Hugging Face dir, dequantized, verified by logits",
        run="domainlm.pretrain.convert.command:from_gguf", config="domainlm.pretrain.convert.config:FromGGUFConfig",
        inputs="domainlm.pretrain.convert.command:inputs_from_gguf",
    ),
    Command(
        stages.CONVERT_TO_GGUF, "Hugging Face dir (+ adapter, merged) -> one GGUF for llama.cpp / Ollama, verified",
        run="domainlm.finetune.to_gguf:to_gguf", config="domainlm.pretrain.convert.config:ToGGUFConfig",
    ),
    Command(
        stages.CONVERT_BASE, "the base model as an HF dir: a packaged base, a GGUF file or an HF dir",
        run="domainlm.pretrain.convert.base:prepare", config="domainlm.pretrain.convert.config:BaseConfig",
        inputs="domainlm.pretrain.convert.base:inputs",
    ),
    Command(
        "finetune sft", "instruction-tune an HF Llama model: LoRA / DoRA / QLoRA (peft) or full, answer-only loss",
        run="domainlm.finetune.command:sft", config="domainlm.finetune.config:SFTConfig",
        inputs="domainlm.finetune.inputs:inputs",
    ),
    Command(
        stages.FINETUNE_DPO, "preference-tune a model or an SFT adapter on chosen/rejected pairs: DPO or IPO (peft)",
        run="domainlm.finetune.command:dpo", config="domainlm.finetune.config:DPOConfig",
        inputs="domainlm.finetune.inputs:inputs_dpo",
    ),
    Command(
        "finetune merge", "merge an adapter into its base model: an HF model dir, verified by logits",
        run="domainlm.finetune.command:merge", config="domainlm.finetune.config:MergeConfig",
        inputs="domainlm.finetune.inputs:inputs_merge",
    ),
    Command(
        "index build", "chunk a corpus and index it for retrieval: BM25 (bm25s) + dense vectors (faiss)",
        run="domainlm.serve.index_build:build", config="domainlm.serve.config:IndexBuildConfig",
        inputs="domainlm.serve.index_build:inputs",
    ),
    Command(
        "index query", "ask an index a question: the chunks it retrieves, with document ids and sources",
        run="domainlm.serve.index_query:query_command", arguments="domainlm.serve.index_query:add_arguments",
    ),
    Command(
        "serve", "OpenAI-compatible HTTP server with retrieval (RAG), adapters by model name, secure defaults",
        run="domainlm.serve.command:serve", config="domainlm.serve.config:ServeConfig",
    ),
    Command(
        stages.EVAL_QA, "answer held-out QA with a model (zero-shot, few-shot or RAG) and score every answer",
        run="domainlm.eval.command:qa", config="domainlm.eval.config:EvalQAConfig",
        inputs="domainlm.eval.command:inputs_qa",
    ),
    Command(
        stages.EVAL_PPL, "perplexity of a model (+ adapter) on a shards dir or corpus files",
        run="domainlm.eval.command:ppl", config="domainlm.eval.config:EvalPplConfig",
    ),
    Command(
        stages.EVAL_RETRIEVAL, "recall@1/@k and MRR of an index on QA with gold documents, per retriever",
        run="domainlm.eval.command:retrieval", config="domainlm.eval.config:EvalRetrievalConfig",
    ),
    Command(
        stages.EVAL_RAG_DATA, "SFT+RAG training data: QA train pairs with retrieved sources in their prompts",
        run="domainlm.eval.command:rag_data", config="domainlm.eval.config:RagDataConfig",
        inputs="domainlm.eval.command:inputs_rag_data",
    ),
    Command(
        stages.EVAL_PAIRS, "preference pairs from a model's own wrong answers to QA train questions (for finetune dpo)",
        run="domainlm.eval.pairs:pairs", config="domainlm.eval.config:PairsConfig",
        inputs="domainlm.eval.command:inputs_pairs",
    ),
    Command(
        stages.COMPARE, "which approach for this domain? prompting, RAG, SFT, SFT+RAG on the same held-out QA",
        run="domainlm.eval.compare:run", config="domainlm.eval.config:CompareConfig",
        inputs="domainlm.eval.compare:inputs",
    ),
    Command(
        stages.REPORT, "render a run directory as one HTML page with charts",
        run="domainlm.eval.report:report", config="domainlm.eval.config:ReportConfig",
    ),
    Command(
        "run", "run a pipeline config: every stage in order, skipping those up to date",
        run="domainlm.pipeline:run_command", arguments="domainlm.pipeline:add_arguments",
    ),
]

GROUP_HELP = {
    "corpus": "build a corpus to start from",
    "tokenizer": "train and evaluate a domain tokenizer",
    "data": "turn a corpus into training shards",
    "launch": "launch a stage on many processes, GPUs or nodes (torchrun, Slurm)",
    "convert": "convert checkpoints between megatron-core and Hugging Face (Llama); GGUF <-> Hugging Face",
    "finetune": "instruction-tune a model (peft adapters or full), preference-tune it (DPO), merge adapters",
    "index": "build and query the retrieval index of a corpus (BM25 + dense, hybrid)",
    "eval": "evaluate a model: QA accuracy, perplexity, retrieval quality; SFT+RAG data, preference pairs",
}


def resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def find_command(name: str) -> Command:
    for c in COMMANDS:
        if c.name == name:
            return c
    raise KeyError(name)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=38, width=100)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the command it names gets its (generated) arguments, since
    generating every command's flags costs more than the rest of a short command's start."""
    words_given = [a for a in (argv or []) if not a.startswith("-")][:2]
    parser = argparse.ArgumentParser(
        prog="domainlm", formatter_class=_Formatter,
        description="Build a domain-specific language model: corpus -> tokenizer -> shards -> "
        "pretraining -> Hugging Face -> fine-tuning -> serving.",
        epilog="Run `domainlm COMMAND --help` for a command's options and their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"domainlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        words = cmd.name.split()
        if len(words) == 1:
            sub = top.add_parser(words[0], help=cmd.help, formatter_class=_Formatter)
        else:
            if words[0] not in groups:
                gp = top.add_parser(words[0], help=GROUP_HELP.get(words[0], ""), formatter_class=_Formatter,
                                    description=GROUP_HELP.get(words[0], ""))
                groups[words[0]] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", title="subcommands")
                gp.set_defaults(_group=gp)
            sub = groups[words[0]].add_parser(words[1], help=cmd.help, formatter_class=_Formatter)
        sub.set_defaults(_command=cmd, _parser=sub)
        if argv is None or words_given[: len(words)] == words:
            _fill(sub, cmd)
    return parser


def _fill(sub: argparse.ArgumentParser, cmd: Command) -> None:
    if cmd.config:
        cls = resolve(cmd.config)
        sub.description = inspect.cleandoc(cmd.description or cls.__doc__ or cmd.help)
        add_config_arguments(sub, cls)
    elif cmd.arguments:
        fn = resolve(cmd.run)
        sub.description = inspect.cleandoc(cmd.description or fn.__doc__ or cmd.help)
        resolve(cmd.arguments)(sub)


def _refuse_unknown(sub: argparse.ArgumentParser, unknown: list[str]) -> None:
    """argparse's 'unrecognized arguments', plus the closest valid flag for a mistyped one."""
    flags = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    for word in unknown:
        if word.startswith("--"):
            name = word.partition("=")[0]
            close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; see `{sub.prog} --help`"
            if not close and sub.prog.split()[1:2] == ["launch"]:
                hint = f"; the stage's own arguments go after --: `{sub.prog} [options] -- {name} ...`"
            sub.error(f"unrecognized argument {name}{hint}")
    sub.error(f"unrecognized arguments: {' '.join(unknown)}")


def main(argv: list[str] | None = None) -> int:
    from domainlm.progress import setup_logging

    args = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(args)
    ns, unknown = parser.parse_known_args(args)
    if unknown:
        _refuse_unknown(getattr(ns, "_parser", None) or parser, unknown)
    setup_logging(ns.verbose)
    from domainlm.manifest import forget_left_out

    forget_left_out()
    cmd: Command | None = getattr(ns, "_command", None)
    if cmd is None:
        (getattr(ns, "_group", None) or parser).print_help(sys.stderr)
        return 2
    try:
        if cmd.config:
            cfg = config_from_args(resolve(cmd.config), ns)
            if ns.print_config:
                print(dump_yaml(cfg), end="")
                return 0
            result = resolve(cmd.run)(cfg)
        else:
            result = resolve(cmd.run)(ns)
        return result if isinstance(result, int) else 0
    except UserError as e:
        print(f"domainlm {cmd.name}: error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"domainlm {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
