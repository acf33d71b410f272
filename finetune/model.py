"""The model being fine-tuned: the HF base, peft's adapters, the loss, the distributed wrapper.

Whose is what: transformers loads the base (`AutoModelForCausalLM`, with `BitsAndBytesConfig`
for QLoRA's 4-bit NF4 base) and runs the layers, including packed rows (it turns restarting
position ids into a block-diagonal mask); peft builds LoRA / DoRA / rsLoRA adapters
(`LoraConfig`, `get_peft_model`; QLoRA's base is prepared by `prepare_quantized`, not peft's
`prepare_model_for_kbit_training`, whose fp32 casts grow the activations 1.4x); torch wraps the model for
several processes (DDP for adapters, FSDP2 `fully_shard` per decoder layer for full fine-tuning).
Ours: the loss, a sum over supervised tokens computed from the final hidden states, so the
trainer can normalize it over a whole step and `--kernels triton` can fuse the output layer with
the cross-entropy (never building the logits).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

from domainlm.errors import UserError
from domainlm.finetune.chat import IGNORE
from domainlm.finetune.config import SFTConfig
from domainlm.pretrain.convert.hfdir import HFDir

# peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
# FutureWarning on every adapter load; a library-version notice, not something a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


def quiet_transformers() -> None:
    """transformers' own progress bars (loading and writing weights) only where ours show."""
    from transformers.utils import logging as hf_logging

    from domainlm.progress import bars_enabled

    if not bars_enabled():
        hf_logging.disable_progress_bar()


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but CUDA is not available; use --train.device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_qlora_runs(device: torch.device) -> None:
    """QLoRA needs bitsandbytes' 4-bit kernels, which run on CUDA GPUs: refuse it anywhere else."""
    if device.type != "cuda":
        raise UserError("method qlora needs a CUDA GPU (bitsandbytes' 4-bit NF4 kernels); this run is on "
                        f"{device.type}: use --method lora here, or run on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("method qlora needs bitsandbytes, which is not installed: pip install bitsandbytes "
                        "(or use --method lora)")


def bnb_config():
    """QLoRA's base: NF4 with double quantization, bf16 compute (Dettmers et al. 2023)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_base(hf: HFDir, cfg: SFTConfig, device: torch.device, bf16: bool):
    """The base model on `device`: bf16 for adapters on GPU, 4-bit for QLoRA, else fp32."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    kw = {"attn_implementation": "sdpa"}
    if cfg.method == "qlora":
        kw.update(quantization_config=bnb_config(), dtype=torch.bfloat16, device_map={"": device.index or 0})
    else:
        # Full fine-tuning keeps fp32 master weights (bf16 compute by autocast / FSDP's policy).
        kw["dtype"] = torch.bfloat16 if bf16 and cfg.method != "full" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf.path), **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"model {str(hf.path)!r} does not load in transformers "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if cfg.method != "qlora":
        model.to(device)
    model.config.use_cache = False
    return model


def linear_names(model) -> list[str]:
    """'all-linear' as module names: every linear layer of the decoder, not the output layer.

    peft would resolve 'all-linear' itself but records full paths (model.layers.0.self_attn.q_proj,
    one per layer) in adapter_config.json; the short names are the portable form that peft, vLLM
    and the serving stage all read the same way."""
    out_layer = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not out_layer})


def lora_config(cfg: SFTConfig, model):
    from peft import LoraConfig

    targets = cfg.lora.target_modules
    return LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
        target_modules=linear_names(model) if targets == ["all-linear"] else list(targets),
        use_rslora=cfg.lora.rslora, use_dora=cfg.method == "dora", task_type="CAUSAL_LM")


def prepare_quantized(model) -> None:
    """QLoRA's base before the adapters: frozen, its bf16 parameters (embedding, norms, output
    layer) left in bf16.

    peft's `prepare_model_for_kbit_training` would also cast those to fp32. The embedding's fp32
    output then makes the residual stream fp32, and with it every norm's output, every 4-bit
    layer's output (bitsandbytes returns its input's dtype) and what autograd keeps of them: 1.4x
    what a layer keeps for backward (`bench/activations.py --qlora`, counted on CPU), and on an
    H100 QLoRA took 17.6 GiB against bf16 LoRA's 13.85 at the 1B shape. TRL's
    SFTTrainer does not call it either. Its other steps are not needed here: gradient
    checkpointing is enabled by `build`, non-reentrant, so the inputs need no grad."""
    for p in model.parameters():
        p.requires_grad_(False)


def keep_input_dtype(model) -> int:
    """Turn off peft's cast of each LoRA layer's input to its adapter weights' dtype, for a model
    that always runs under autocast (bf16 training). peft casts the bf16 hidden states to the fp32
    adapters' dtype, then autocast casts them back to bf16 for the matmul: the values are the same,
    but each LoRA A keeps its own fresh copy for backward, so the one norm output read by q, k and v
    is kept three times, the one read by gate and up twice, and o_proj's input once more beside
    SDPA's own output (4H values a token and layer more than needed, 16 KiB at the 1B shape,
    bench/activations.py --lora; and the recomputation of finetune/kernels.py finds only copies).
    Without the cast autocast gives the matmul the hidden states as they are. Plain LoRA layers
    only: DoRA's variant does elementwise work on the input outside the matmuls, which the cast
    keeps in fp32 (without it its loss moved by 5e-5 relative). Returns how many layers it set."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not getattr(module, "lora_variant", None):
            module.cast_input_dtype_enabled = False
            n += 1
    return n


def build(hf: HFDir, cfg: SFTConfig, device: torch.device, bf16: bool):
    """The model to train (a PeftModel, or the HF model itself for full fine-tuning)."""
    torch.manual_seed(cfg.train.seed)           # the adapters' init
    model = load_base(hf, cfg, device, bf16)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "full":
        return model
    if cfg.method == "qlora":
        prepare_quantized(model)
    from peft import get_peft_model

    start = getattr(cfg, "adapter", "")
    if start:                      # finetune dpo: keep training an SFT adapter
        from peft import PeftModel

        return PeftModel.from_pretrained(model, start, is_trainable=True)
    try:
        return get_peft_model(model, lora_config(cfg, model))
    except ValueError as e:        # e.g. target modules that the model does not have
        raise UserError(f"lora: {str(e).splitlines()[0]}") from None


def causal_lm(model):
    """The transformers CausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class LossModel(torch.nn.Module):
    """forward(batch) -> summed cross-entropy over supervised tokens (labels shifted by one).

    The sum, not the mean: the trainer divides by the step's supervised tokens over all
    micro-batches and processes. With `fused`, the output projection and the loss run in
    `fused_linear_cross_entropy` (chunks of tokens, no [tokens, vocab] logits)."""

    def __init__(self, model, fused: bool = False, recompute: bool = False):
        super().__init__()
        self.model = model
        self.fused = fused
        self.recompute = recompute

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, per_row: bool = False):
        """The summed loss, or with `per_row` each row's own sum ([b], fp32: a completion's
        negative log-probability, what DPO compares; never fused). With `recompute`, the
        kernels' norm and SwiGLU outputs are recomputed in backward, not kept
        (finetune/kernels.py: recompute_elementwise)."""
        if self.recompute:
            from domainlm.finetune.kernels import recompute_elementwise

            with recompute_elementwise():
                return self._loss(input_ids, labels, attention_mask, position_ids, per_row)
        return self._loss(input_ids, labels, attention_mask, position_ids, per_row)

    def _loss(self, input_ids, labels, attention_mask, position_ids, per_row):
        lm = causal_lm(self.model)
        decoder = getattr(lm, lm.base_model_prefix)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        target = labels[:, 1:]
        keep = target != IGNORE
        # Only the positions that predict a supervised token go through the output layer: the
        # logits of prompts and padding would be computed only to be ignored (with answer-only
        # loss that is most of them, and the output layer is the widest matmul of a small model).
        hidden = out.last_hidden_state[:, :-1, :][keep]
        target = target[keep]
        head = lm.get_output_embeddings()
        if per_row:
            rows = keep.nonzero()[:, 0]
            token = F.cross_entropy(head(hidden).float(), target, reduction="none")
            return torch.zeros(labels.shape[0], dtype=token.dtype, device=token.device).index_add(0, rows, token)
        if self.fused and type(head) is torch.nn.Linear and head.bias is None:
            from domainlm.pretrain.kernels.fused_linear_ce import fused_linear_cross_entropy

            return fused_linear_cross_entropy(hidden.to(head.weight.dtype), head.weight, target,
                                              ignore_index=IGNORE, reduction="sum")
        return F.cross_entropy(head(hidden).float(), target, reduction="sum")


def distribute(loss_model: LossModel, cfg: SFTConfig, world: int, device: torch.device, bf16: bool):
    """DDP around the loss model (adapters), or FSDP2 per decoder layer (full fine-tuning)."""
    if world == 1:
        return loss_model
    if cfg.method == "full":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
        lm = causal_lm(loss_model.model)
        for layer in getattr(lm, lm.base_model_prefix).layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(loss_model, mp_policy=mp)
        return loss_model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(loss_model, device_ids=[device.index] if device.type == "cuda" else None)


def parameter_counts(model) -> dict[str, int]:
    """Trainable and total parameters (4-bit weights counted as their logical sizes)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state"):           # bitsandbytes Params4bit pack two weights per byte
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


class gathered:
    """Context: the root of an FSDP2 model unsharded (its embedding, final norm and output layer),
    so `generate` can run the model outside the root's forward; nothing to do otherwise."""

    def __init__(self, module):
        from torch.distributed.fsdp import FSDPModule

        self.module = module if isinstance(module, FSDPModule) else None

    def __enter__(self):
        if self.module is not None:
            self.module.unshard()
        return self

    def __exit__(self, *exc):
        if self.module is not None:
            self.module.reshard()
