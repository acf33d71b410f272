"""The `finetune sft` trainer, in the shape every domainlm trainer has: setup, train, train_step, close.

setup: every check that can fail (model dir, chat template, QLoRA on this machine, output dir,
data) before any compute; then the process group (under torchrun), the model with its adapters,
the optimizer and schedule, the batch stream, and the resume or the checks before training.
train: steps until the end or a stop signal, a checkpoint every checkpoint.save_every steps and
on SIGTERM / SIGUSR1 (the step finishes, the state is saved, the process exits 0: rerun to go on).
finish: the checks after training, then the output dir (atomically, manifest last).

Why our loop and not transformers' Trainer / TRL's SFTTrainer: the loss is normalized by the
supervised tokens of the whole step over every micro-batch and process (so DP=N equals one
process accumulating the same micro-batches, tested), the data position is a function of the
step alone (so a resume is exact, also under another process count, tested with a kill), a stop
signal saves at a step boundary, and the fused loss needs the hidden states, not logits. The
parts those libraries do well are theirs: the model and generation (transformers), the adapters
and their files (peft), AdamW, DDP / FSDP and distributed checkpoints (torch), the schedule
(torch's LambdaLR).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from domainlm import stages
from domainlm.errors import UserError
from domainlm.finetune import checkpoint
from domainlm.finetune.config import SFTConfig
from domainlm.manifest import StageOutput, fingerprint
from domainlm.devices import cpu_has_bf16, init_process_group
from domainlm.progress import log

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STAGE = stages.FINETUNE_SFT


class Trainer:
    stage = STAGE
    """The manifest's stage (and the run's fingerprint)."""

    def __init__(self, cfg: SFTConfig, inputs: list[dict] | None = None):
        self.cfg = cfg
        self.inputs = inputs
        self.step = 0
        self.stop_signal: int | None = None
        self.metrics = None
        self.history: list[dict] = []
        self.evals: dict = {}
        self.step_extra: dict = {}
        """What a subclass's train_step adds to the step's metrics (DPO: reward margin, accuracy)."""
        self._owns_process_group = False

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        from domainlm.finetune import model as modeling
        from domainlm.finetune.chat import ChatEncoder, pad_id
        from domainlm.pretrain.convert.hfdir import open_hf_dir

        cfg, t = self.cfg, self.cfg.train
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = modeling.pick_device(t.device)
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        if self.bf16 and self.device.type == "cpu" and not cpu_has_bf16():
            log.warning("train.precision=bf16: this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 is "
                        "slower than fp32; training in fp32")
            self.bf16 = False
        if cfg.method == "qlora":
            modeling.check_qlora_runs(self.device)
        if t.global_batch_size % (t.micro_batch_size * self.world):
            raise UserError(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size "
                            f"x processes = {t.micro_batch_size} x {self.world}; make it a multiple of "
                            f"{t.micro_batch_size * self.world}")
        self.hf = open_hf_dir(cfg.model)
        self.hf.require_llama_family(self.stage)
        self.template = self._chat_template()
        StageOutput(cfg.output, self.stage, overwrite=cfg.overwrite)        # refuses a foreign output dir now
        self.root = Path(cfg.run_dir())
        if self.inputs is None:
            from domainlm.finetune.inputs import inputs

            self.inputs = inputs(cfg)
        self.fingerprint = fingerprint(self.stage, cfg, self.inputs)
        resume = checkpoint.inspect(self.root, self.fingerprint, cfg.overwrite, self.rank)

        tok = self.hf.tokenizer()
        self.encoder = ChatEncoder(tok, self.template)
        t0 = time.perf_counter()
        if self.hf.max_positions and t.seq_len > self.hf.max_positions and self.rank == 0:
            log.info("samples are held to %d tokens, the model's max_position_embeddings (train.seq_len %d%s)",
                     self.hf.max_positions, t.seq_len, ": the length of a packed row" if cfg.packing else "")
        self.data = self._prepare_data()
        if self.rank == 0:
            log.info("data: %s (%.1fs)", self._describe_data(), time.perf_counter() - t0)
        self._init_distributed()
        if self.rank == 0:
            checkpoint.prepare(self.root, self.fingerprint)
            from domainlm.finetune.records import write_dead_letters

            self.dead_letters = write_dead_letters(self.root / "dead_letter.jsonl", *self.data.readers)
        self.pad = pad_id(tok)
        self._make_batches()
        self.total_steps = t.max_steps or self.batches.steps_for(t.epochs)
        self._build(modeling)
        self._prepare_checks()
        self._barrier()
        if resume is not None:
            self._resume(resume)
        else:
            self.evals["before"] = self.run_checks("before")
            if self.rank == 0:
                checkpoint.write_json(self.root, "before.json", self.evals["before"])
        self._install_signal_handlers()
        from domainlm.finetune.metrics import Metrics

        self.metrics = Metrics(self.root / "logs" if self.rank == 0 else None, total_steps=self.total_steps,
                               tensorboard=cfg.log.tensorboard)

    def _prepare_data(self):
        from domainlm.finetune import dataset

        return dataset.prepare(self.cfg, self.encoder, self.hf.max_positions)

    def _describe_data(self) -> str:
        tr = self.data.stats["train"]
        unit = "pairs" if "pairs" in tr else "samples"                 # finetune dpo counts pairs
        return (f"{tr[unit]} training {unit} ({tr['tokens']} tokens, {tr['supervised_tokens']} supervised), "
                f"{len(self.data.valid)} validation {unit}, dropped {dict(tr.get('dropped', {})) or 'none'}")

    def _make_batches(self) -> None:
        """self.batches (the step-indexed training stream) and self.valid (the validation micro-batches)."""
        from domainlm.finetune import batches

        cfg, t = self.cfg, self.cfg.train
        self.batches = batches.Batches(self.data.train, global_batch=t.global_batch_size,
                                       micro_batch=t.micro_batch_size, seed=t.seed, packing=cfg.packing,
                                       seq_len=t.seq_len, pad_id=self.pad)
        self.valid = batches.fixed_batches(self.data.valid, t.micro_batch_size, self.pad, cfg.packing, t.seq_len,
                                           cfg.eval.valid_batches) if self.data.valid else []

    def _chat_template(self) -> str:
        from domainlm.finetune.chat import check_template

        if self.cfg.chat_template:
            p = Path(self.cfg.chat_template)
            if not p.is_file():
                raise UserError(f"chat_template: file {self.cfg.chat_template!r} not found")
            text = p.read_text(encoding="utf-8")
            if "messages" not in text:
                raise UserError(f"chat_template: {self.cfg.chat_template!r} is not a Jinja chat template "
                                "(it never reads `messages`)")
            check_template(text, f"chat_template: {self.cfg.chat_template!r}")
            return text
        text = self.hf.require_chat_template("finetune sft")
        check_template(text, f"the chat template of model {self.cfg.model!r}",
                       "fix it, or give a template file with --chat-template")
        return text

    def _init_distributed(self) -> None:
        if self.world == 1 or dist.is_initialized():
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        init_process_group(backend, init_method=init, rank=self.rank, world_size=self.world,
                           timeout=timedelta(minutes=30))
        self._owns_process_group = True

    def _build(self, modeling) -> None:
        cfg = self.cfg
        self.peft_model = modeling.build(self.hf, cfg, self.device, self.bf16)
        self.kernel_counts = None
        if cfg.kernels == "triton":
            from domainlm.finetune.kernels import apply_kernels
            from domainlm.pretrain.kernels import resolve_kernels

            if resolve_kernels("triton", self.device) == "triton":
                self.kernel_counts = apply_kernels(self.peft_model)
                log.info("kernels: %s", self.kernel_counts)
        if self.bf16:             # every forward runs under autocast (self.autocast below)
            modeling.keep_input_dtype(self.peft_model)
        self.params = modeling.parameter_counts(self.peft_model)
        self.loss_model = modeling.LossModel(self.peft_model, fused=self.kernel_counts is not None,
                                             recompute=self.kernel_counts is not None and cfg.recompute_elementwise)
        self.model = modeling.distribute(self.loss_model, cfg, self.world, self.device, self.bf16)
        o = cfg.optim
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.trained = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        warmup = cfg.schedule.warmup_steps
        self.warmup = min(max(1, round(0.03 * self.total_steps)) if warmup is None else warmup, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_for(cfg.schedule.style, self.warmup, self.total_steps, o.min_lr_ratio))
        device_type = self.device.type
        self.autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if self.bf16 else contextlib.nullcontext

    def _prepare_checks(self) -> None:
        """What the checks before and after training read: held-out QA, forgetting text."""
        cfg = self.cfg
        self.qa = []
        if cfg.eval.qa:
            from domainlm.qa import read_qa

            self.qa = read_qa(cfg.eval.qa)[:cfg.eval.qa_max]
            trained = sum(qa.split == "train" for qa in self.qa)
            if trained and self.rank == 0:
                log.warning("eval.qa: %d of the %d QA records say \"split\": \"train\": their scores are of "
                            "training questions, not held-out ones; give FILE:test for held-out scores", trained,
                            len(self.qa))
        self.forgetting = None
        if cfg.forgetting_data:
            from domainlm.finetune.evaluate import forgetting_windows

            window = min(cfg.train.seq_len, self.hf.max_positions or cfg.train.seq_len)
            self.forgetting = forgetting_windows(cfg.forgetting_data, self.encoder.tok, self.hf.path, window,
                                                 cfg.eval.forgetting_tokens)

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_signal = signum

        self._old_handlers = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    # -- checks before / after -----------------------------------------------------------------

    @torch.no_grad()
    def run_checks(self, when: str) -> dict:
        """Validation loss, points' pass rates, QA EM/F1, forgetting perplexity (every process runs
        them: under FSDP each forward needs all processes)."""
        from domainlm.finetune import evaluate
        from domainlm.finetune.model import gathered
        from domainlm.finetune.points import run_points

        e, out, t0 = self.cfg.eval, {}, time.perf_counter()
        if self.valid:
            out["valid_loss"] = self.validate()
        with gathered(self.loss_model), self.autocast():
            answer = lambda convs: evaluate.generate(  # noqa: E731
                self.peft_model, self.encoder, convs, new_tokens=e.new_tokens, batch_size=e.batch_size,
                desc=f"points ({when})")
            if self.data.points:
                out["points"] = run_points(self.data.points, answer)
            if self.qa:
                out["qa"] = evaluate.qa_scores(self.peft_model, self.encoder, self.qa, new_tokens=e.new_tokens,
                                               batch_size=e.batch_size)
        if self.forgetting:
            with self.autocast():
                out["forgetting_ppl"] = evaluate.perplexity(self.loss_model, self.forgetting["windows"], e.batch_size,
                                                            self.device)
        if self.rank == 0:
            log.info("checks %s training: %s (%.1fs)", when, describe_checks(out), time.perf_counter() - t0)
        return out

    @torch.no_grad()
    def validate(self) -> float:
        total = count = 0.0
        was = self.loss_model.training
        self.loss_model.eval()
        for mb in self.valid:
            mb = mb.to(self.device)
            with self.autocast():
                total += float(self.loss_model(mb.input_ids, mb.labels, mb.attention_mask, mb.position_ids))
            count += int((mb.labels[:, 1:] != -100).sum())
        self.loss_model.train(was)
        return total / max(count, 1)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self) -> None:
        checkpoint.save(self.root, self.step, self.model, self.optimizer, self.scheduler,
                        full=self.cfg.method == "full", rank=self.rank, keep_last=self.cfg.checkpoint.keep_last)
        if self.rank == 0:
            log.info("saved %s", checkpoint.step_name(self.step))

    def _resume(self, step: int) -> None:
        state = checkpoint.load(self.root, step, self.model, self.optimizer, self.scheduler,
                                full=self.cfg.method == "full", rank=self.rank)
        self.step = int(state["step"])
        self.evals["before"] = checkpoint.read_json(self.root, "before.json") or {}
        if self.rank == 0:
            log.info("resumed from %s", checkpoint.step_name(step))

    # -- training ------------------------------------------------------------------------------

    def _sync(self, last: bool):
        """Gradients are reduced across processes on the last micro-batch of a step only."""
        if self.world == 1:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):                      # DDP
            return contextlib.nullcontext() if last else self.model.no_sync()
        self.model.set_requires_gradient_sync(last)              # FSDP2
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step; returns (mean token loss over the step, grad norm, tokens)."""
        self.loss_model.train()         # from_pretrained hands models over in eval mode: no dropout
        micro, supervised = self.batches.step(self.step, self.rank, self.world)
        # DDP / FSDP average gradients over processes: scale by their number so the result is
        # the sum over the step's supervised tokens divided by their count.
        scale = self.world / supervised
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for j, mb in enumerate(micro):
            mb = mb.to(self.device)
            with self._sync(j == len(micro) - 1), self.autocast():
                s = self.model(mb.input_ids, mb.labels, mb.attention_mask, mb.position_ids)
            (s * scale).backward()
            loss_sum += s.detach().double().cpu()
            tokens += mb.tokens
        grad_norm = self._optimizer_step()
        if self.world > 1:
            both = torch.tensor([float(loss_sum), float(tokens)], dtype=torch.float64, device=self.device)
            dist.all_reduce(both)
            loss_sum, tokens = both[0].cpu(), int(both[1])
        return float(loss_sum) / supervised, grad_norm, tokens

    def _optimizer_step(self) -> float:
        """Clip, step the optimizer and the schedule, clear the gradients, count the step; the grad norm."""
        clip = self.cfg.optim.clip_grad or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trained, clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm

    def _stop_requested(self) -> bool:
        if self.world == 1:
            return self.stop_signal is not None
        flag = torch.tensor([1 if self.stop_signal else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> bool:
        """Train to the last step; False when stopped by a signal (state saved)."""
        from domainlm.finetune.metrics import memory_gb

        cfg = self.cfg
        self.start_step, t0 = self.step, time.perf_counter()
        self.tokens_trained = 0
        self.metrics.start(self.step)
        every = cfg.checkpoint.save_every
        while self.step < self.total_steps:
            lr = self.scheduler.get_last_lr()[0]
            loss, grad_norm, tokens = self.train_step()
            self.metrics.count(tokens)
            self.tokens_trained += tokens
            last = self.step == self.total_steps
            rec = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, **self.step_extra}
            if self.step % cfg.log.every == 0 or last or self.step == self.start_step + 1:
                rec = self.metrics.train(self.step, loss=loss, lr=lr, grad_norm=grad_norm,
                                         memory_gb=memory_gb(self.device), **self.step_extra)
            t_other = time.perf_counter()
            if self.valid and cfg.eval.every and self.step % cfg.eval.every == 0 and not last:
                rec.update(self.metrics.eval(self.step, self.validate()))
            self.history.append(rec)
            stopped = self._stop_requested()
            if stopped or (every and self.step % every == 0 and not last):
                self.save()
            self.metrics.exclude(time.perf_counter() - t_other)
            if stopped:
                self.seconds = time.perf_counter() - t0
                return False
        self.seconds = time.perf_counter() - t0
        return True

    # -- the output ----------------------------------------------------------------------------

    def finish(self) -> dict | None:
        """Checks after training, then the output dir (first process). Returns the manifest."""
        from domainlm.finetune import output

        self.evals["after"] = self.run_checks("after")
        if self.valid and "valid_loss" in self.evals["after"]:
            self.metrics.eval(self.step, self.evals["after"]["valid_loss"])
        state = output.gather_full_state(self) if self.cfg.method == "full" and self.world > 1 else None
        manifest = None
        if self.rank == 0:
            self.metrics.close()
            manifest = output.write(self, state)
        self._barrier()
        if self.rank == 0 and not self.cfg.checkpoint.keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)
        return manifest

    def extra_facts(self) -> dict:
        """The manifest's fields a subclass adds (DPO: its loss, beta and reference)."""
        return {}

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)
        if self.metrics is not None:
            self.metrics.close()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False


def describe_checks(out: dict) -> str:
    parts = []
    if "valid_loss" in out:
        parts.append(f"valid loss {out['valid_loss']:.4f}")
    if "points" in out:
        parts.append("points " + ", ".join(f"{k} {v['passed']}/{v['tests']}" for k, v in out["points"].items()))
    if "qa" in out:
        parts.append(f"QA exact match {out['qa']['exact_match']:.3f} F1 {out['qa']['f1']:.3f}")
    if "forgetting_ppl" in out:
        parts.append(f"forgetting ppl {out['forgetting_ppl']:.2f}")
    return "; ".join(parts) or "none asked for"


def lr_lambda_for(style: str, warmup: int, total: int, min_ratio: float):
    """lr multiplier of the step with 0-based index s: linear warmup reaching 1 at step `warmup`
    (the first step already learns, unlike schedules that start at 0), then cosine or linear
    decay to `min_ratio` at the last step, or constant."""
    import math

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if style == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if style == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return factor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
