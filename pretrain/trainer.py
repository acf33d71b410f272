"""`domainlm pretrain`: the trainer, in the shape every domainlm trainer has: setup, train,
train_step, close. One process per rank (torchrun), or a single process without torchrun.

setup: check everything that can be wrong (config, layout, tokenizer vs shards, checkpoint dir)
before any compute, then process groups, model, optimizer, schedule, loaders, and the resume.
The GPU path is megatron-core's: DistributedDataParallel, the distributed optimizer, and
get_forward_backward_func's schedules (1F1B when PP > 1, interleaved with virtual stages). The CPU
path swaps in the stand-ins of cpu_compat.py, which keep the same math, and runs megatron's own
pipeline schedules and p2p exchange over gloo. The model is a list of chunks, one per virtual
pipeline stage (one without), as Megatron-LM's get_model builds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from domainlm.errors import UserError
from domainlm.manifest import make_manifest
from domainlm.progress import log, summary
from domainlm.pretrain import checkpoint, init_from, optimizer as optim, rng
from domainlm.pretrain.config import PretrainConfig, inputs
from domainlm.pretrain.metrics import Metrics, flops_per_token, memory_gb, peak_flops
from domainlm.data.shards import open_shards_dir
from domainlm.tokenizer.tokdir import check_same, load_tokenizer_dir
from domainlm.devices import init_process_group

# megatron-core warns at import that Transformer Engine / Apex are absent (the local path is
# meant), about a cuda-graph default we do not use, and torch DCP about its ShardedTensor API.
for _pattern in (r".*(Transformer Engine|Apex|apex).*", r"full scope is deprecated.*",
                 r".*transformer_engine as the transformer implementation.*",
                 r".*deprecating ShardedTensor.*", r"`load_state_dict` is deprecated.*"):
    warnings.filterwarnings("ignore", message=_pattern)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def main(cfg: PretrainConfig) -> int:
    """Entry point of `domainlm pretrain` (one rank)."""
    if cfg.model.num_layers is None:        # model.size: init_from, whose dir an earlier stage made
        cfg.validate()
        if cfg.model.num_layers is None:
            raise UserError(f"model.size: init_from: {cfg.init_from!r} has no config.yaml; give a "
                            "`domainlm convert from-hf` output")
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
    return 0


class Trainer:
    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.step = 0
        self.stop_signal: int | None = None
        self.metrics: Metrics | None = None
        self.train_loader = self.valid_loader = None
        self.history: list[dict] = []
        self._owns_process_group = False

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        resume_step = self._check(world)
        self._init_distributed(world)
        self._build()
        t = self.cfg.train
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.train_loader = self._loader("train")
        self.eval_micro_batch = t.micro_batch_size
        self.valid_loader = self._loader("valid") if self.cfg.eval.every else None
        if self.valid_loader is not None and self._eval_batches() == 0:
            self._small_valid_split()
        if self.rank == 0:
            checkpoint.prepare(self.root, self.cfg, self.tok, self._manifest())
        dist.barrier()
        if resume_step is not None:
            self._resume(resume_step)
        elif self.init_from is not None:
            self._init_weights()
        self.train_iter = iter(self.train_loader)
        self._install_signal_handlers()
        self.metrics = self._metrics(world)

    def _check(self, world: int) -> int | None:
        """Every check that needs no process group, before any compute; the step to resume."""
        cfg = self.cfg
        self.device = _device(cfg.train.device)
        if not cfg.data.shards:
            raise UserError("data.shards: give at least one shards directory (from `domainlm data shard`)")
        cfg.data.validate()
        if not cfg.tokenizer:
            raise UserError("tokenizer: give the tokenizer directory the shards were built with")
        self.init_from = init_from.check(cfg)
        self.tok = load_tokenizer_dir(cfg.tokenizer)
        _check_shards_tokenizer(cfg.data.shards, self.tok)
        self.dp_size = cfg.check_layout(world, self.device.type)
        cuda_connections(cfg, self.device.type, os.environ)
        cpu = self.device.type == "cpu"
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and not cpu)
        if self.bf16 and cpu:
            raise UserError("train.precision=bf16 needs a GPU (bf16 master-weight optimizer); use fp32 on CPU")
        self.root = Path(cfg.checkpoint.dir)
        resume_step = checkpoint.inspect(cfg, self.tok.identity)
        if resume_step is not None:
            from domainlm.pretrain.model import padded_vocab

            saved = checkpoint.read_run_manifest(self.root).get("padded_vocab_size")
            now = padded_vocab(self.tok.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)
            if saved is not None and saved != now:
                raise UserError(f"checkpoint.dir {cfg.checkpoint.dir!r} holds an embedding of {saved} rows; "
                                f"parallel.tensor={cfg.parallel.tensor} pads the vocab to {now}; resume with a "
                                f"tensor-parallel size that divides {saved}")
        return resume_step

    def _build(self) -> None:
        """Process groups, seeds, model, DDP, optimizer, LR schedule, schedule function."""
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from domainlm.pretrain import cpu_compat
        from domainlm.pretrain.model import build_model_chunks, count_parameters, padded_vocab, transformer_config

        cfg, m, t, p, s = self.cfg, self.cfg.model, self.cfg.train, self.cfg.parallel, self.cfg.schedule
        cpu = self.device.type == "cpu"
        parallel_state.initialize_model_parallel(
            p.tensor, p.pipeline, virtual_pipeline_model_parallel_size=p.virtual_pipeline if p.virtual_pipeline > 1 else None)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        rng.seed(t.seed, self.device.type)
        self.vocab = padded_vocab(self.tok.vocab_size, m.make_vocab_size_divisible_by, p.tensor)
        self.params = count_parameters(m, self.vocab)
        self.tconfig = transformer_config(m, tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline,
                                          sequence_parallel=p.sequence_parallel, bf16=self.bf16,
                                          recompute=t.recompute, cpu=cpu)
        # One chunk per virtual pipeline stage, each in its own DDP (Megatron-LM's get_model).
        chunks = build_model_chunks(m, self.tconfig, vocab_size=self.vocab, seq_len=t.seq_len)
        self.model = [self._wrap_ddp(chunk, cpu, first=i == 0) for i, chunk in enumerate(chunks)]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        no_sync = [chunk.no_sync for chunk in self.model]
        self.tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.optimizer = self._optimizer(cpu)
        decay = s.decay_steps or t.max_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
            lr_warmup_steps=s.warmup_steps, lr_decay_steps=decay,
            lr_decay_style={"wsd": "WSD"}.get(s.style, s.style),
            start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay, wd_incr_steps=decay,
            wd_incr_style="constant", wsd_decay_steps=s.wsd_decay_steps or max(1, decay // 5),
            lr_wsd_decay_style=s.wsd_decay_style)
        if cpu and p.pipeline == 1:
            self.forward_backward = cpu_compat.forward_backward_no_pipelining
        else:   # megatron's: no pipelining, 1F1B, or interleaved 1F1B (virtual stages); on CPU over gloo
            from megatron.core.pipeline_parallel import get_forward_backward_func

            self.forward_backward = get_forward_backward_func()
        self._steps_context = cpu_compat.megatron_steps_on_cpu if cpu else contextlib.nullcontext
        self.positions = torch.arange(t.seq_len, device=self.device).unsqueeze(0)

    def _metrics(self, world: int) -> Metrics:
        m, t, p = self.cfg.model, self.cfg.train, self.cfg.parallel
        peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        if self.rank == 0:
            log.info("pretrain: %s params (%s non-embedding), vocab %d (padded %d), TP=%d PP=%d DP=%d%s%s, "
                     "%d micro-batches of %d per step, %s, %s", f"{self.params['total']:,}",
                     f"{self.params['non_embedding']:,}", self.tok.vocab_size, self.vocab, p.tensor,
                     p.pipeline, self.dp_size,
                     f" VPP={p.virtual_pipeline}" if p.virtual_pipeline > 1 else "",
                     " SP" if p.sequence_parallel else "", self.num_micro, t.micro_batch_size,
                     "bf16" if self.bf16 else "fp32", self.device)
        return Metrics(
            self.root / "logs" if self.rank == 0 else None, total_steps=t.max_steps,
            tokens_per_step=t.global_batch_size * t.seq_len,
            flops_per_token=flops_per_token(self.params["flops"], m.num_layers, m.hidden_size, t.seq_len),
            peak_flops_total=peak * world if peak else None, tensorboard=self.cfg.log.tensorboard)

    def _init_distributed(self, world: int) -> None:
        if dist.is_initialized():
            return
        backend = "gloo" if self.device.type == "cpu" else "nccl"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # Under torchrun the rendezvous is in the environment; a plain process makes its own.
        init = "env://" if "WORLD_SIZE" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        init_process_group(backend, init_method=init, rank=self.rank, world_size=world,
                           timeout=timedelta(minutes=30))
        self._owns_process_group = True

    def _wrap_ddp(self, model, cpu: bool, first: bool = True):
        if cpu:
            from domainlm.pretrain.cpu_compat import CpuDataParallel

            return CpuDataParallel(self.tconfig, model)
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self.cfg.parallel.distributed_optimizer)
        # As Megatron-LM: only the first chunk's buffer is split into buckets.
        return DistributedDataParallel(self.tconfig, ddp, model, disable_bucketing=not first)

    def _optimizer(self, cpu: bool):
        return optim.build(self.cfg.optim, bf16=self.bf16, distributed=self.cfg.parallel.distributed_optimizer,
                           cpu=cpu, model_chunks=self.model)

    def _small_valid_split(self) -> None:
        """A valid split with fewer windows than one micro batch (a small corpus: `data shard`'s
        valid fraction drew one short document) is read in smaller micro batches, one pass of
        them; with no whole window (or fewer than PP under the interleaved schedule), UserError."""
        p, t = self.cfg.parallel, self.cfg.train
        need = p.pipeline if p.virtual_pipeline > 1 else 1
        windows = torch.tensor([self.valid_loader.windows()], device=self.device)
        dist.all_reduce(windows, op=dist.ReduceOp.MIN)        # every data-parallel rank runs the same batches
        windows = int(windows.item())
        if windows < need:
            what = f"{need} windows (the interleaved schedule of parallel.virtual_pipeline={p.virtual_pipeline} runs " \
                   "a multiple of parallel.pipeline micro batches)" if need > 1 else "one window"
            raise UserError(f"the shards' valid split holds {windows} window(s) of {t.seq_len} tokens on a rank, less "
                            f"than {what}; rebuild the shards with a larger --valid-fraction, lower train.seq_len, or "
                            "set eval.every=0")
        self.eval_micro_batch = windows // need
        self.valid_loader = self._loader("valid", micro_batch_size=self.eval_micro_batch)
        if self.rank == 0:
            log.warning("pretrain: the shards' valid split holds %d window(s) of %d tokens, less than one micro batch "
                        "of %d: validating on %d micro batch(es) of %d (a larger --valid-fraction in `data shard` "
                        "gives a steadier validation loss)", windows, t.seq_len, t.micro_batch_size, need,
                        self.eval_micro_batch)

    def _loader(self, split: str, seed: int | None = None, micro_batch_size: int | None = None):
        from domainlm.pretrain.loader import TokenWindowLoader

        t = self.cfg.train
        data = self.cfg.data if seed is None else dataclasses.replace(self.cfg.data, seed=seed)
        return TokenWindowLoader(
            data, split=split, seq_len=t.seq_len, micro_batch_size=micro_batch_size or t.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, vocab_size=self.tok.vocab_size,
            tokenizer_sha256=self.tok.sha256, infinite=split == "train")

    def _manifest(self) -> dict:
        cfg = self.cfg
        return make_manifest(
            checkpoint.STAGE, cfg, inputs(cfg), model=cfg.model.architecture(),
            tokenizer={k: v for k, v in self.tok.entry().items() if k != "path"},
            padded_vocab_size=self.vocab, parameters=self.params, seq_len=self.context())

    def context(self) -> int:
        """The context the checkpoint records (and `convert to-hf` exports): the training sequence
        length, or the context of the model it was initialized from when that is longer (continued
        pretraining at 512 tokens of a base that reads 8,192 keeps 8,192: RoPE has no learned rows)."""
        base = self.init_from.seq_len if self.init_from is not None else None
        return max(self.cfg.train.seq_len, int(base or 0))

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_signal = signum

        self._old_handlers = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    # -- checkpoint state -------------------------------------------------------------------

    def _model_keys(self) -> list[str]:
        """The model's keys in a checkpoint: "model", or model0, model1, ... for virtual pipeline
        chunks (as Megatron-LM names them); the tensors inside are in global coordinates (layer
        numbers of the whole model), so any layout loads them."""
        return ["model"] if len(self.model) == 1 else [f"model{i}" for i in range(len(self.model))]

    def _state(self, *, loading: bool) -> dict:
        """The sharded state dict of a checkpoint (model and optimizer in global coordinates)."""
        from domainlm.pretrain.model import unwrap

        models = {key: unwrap(chunk).sharded_state_dict() for key, chunk in zip(self._model_keys(), self.model)}
        return {
            **models,
            "optimizer": optim.sharded_state_dict(self.optimizer, models, loading=loading),
            "scheduler": self.scheduler.state_dict(),
            "trainer": {"step": self.step, "model": self.cfg.model.architecture(),
                        "layout": self._layout(), "ranks": None if loading else self._gather_rank_states()},
        }

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"tensor": p.tensor, "pipeline": p.pipeline, "data": self.dp_size, "world": dist.get_world_size()}

    def _gather_rank_states(self) -> list:
        """Per-rank RNG states (with the device they were drawn on) and loader positions of every
        rank (saved in the common part)."""
        mine = {**rng.rank_state(self.device), "loader": self.train_loader.state_dict()}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {k: _to_cpu(v) for k, v in mine.items()})
        return gathered

    def save(self) -> None:
        checkpoint.save(self.root, self.step, self._state(loading=False), self.cfg.checkpoint.keep_last,
                        done=self.step >= self.cfg.train.max_steps)
        if self.rank == 0:
            log.info("saved %s", checkpoint.iter_name(self.step))

    def _init_weights(self) -> None:
        """--init-from: the weights of init_from's checkpoint (any saved layout), all chunks in one
        load (dist_checkpointing checks that the ranks together read every shard once)."""
        if len(self.model) == 1:
            self.init_from.load(self.model[0], self.optimizer)
            return
        from domainlm.pretrain.model import unwrap

        src = self.init_from
        chunks = {key: unwrap(chunk) for key, chunk in zip(self._model_keys(), self.model)}
        state = checkpoint.load(src.root, src.step, {key: c.sharded_state_dict() for key, c in chunks.items()})
        for key, chunk in chunks.items():
            chunk.load_state_dict(state[key])
        self.optimizer.reload_model_params()
        if self.rank == 0:
            log.info("initialized the weights from %s (%s); optimizer and schedule start afresh", src.root,
                     checkpoint.iter_name(src.step))

    def _resume(self, step: int) -> None:
        from domainlm.pretrain.model import unwrap

        latest = step
        step, damaged = checkpoint.pick_intact(self.root, step, "checkpoint.dir",
                                               "start afresh in another checkpoint.dir (or with --checkpoint.overwrite)")
        if self.rank == 0:
            for line in damaged:
                log.warning("%s", line)
            if step != latest:
                log.warning("resuming from %s (step %d) instead of %s: %d steps are redone",
                            checkpoint.iter_name(step), step, checkpoint.iter_name(latest), latest - step)
        state = checkpoint.load(self.root, step, self._state(loading=True))
        for key, chunk in zip(self._model_keys(), self.model):
            unwrap(chunk).load_state_dict(state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["trainer"]["step"])
        saved_layout, ranks = state["trainer"]["layout"], state["trainer"]["ranks"]
        if saved_layout == self._layout():
            mine = ranks[self.rank]
            moved = rng.restore(mine, self.device, seed_value=self.cfg.train.seed, step=self.step)
            if moved and self.rank == 0:
                log.warning("%s", moved)
            self.train_loader.load_state_dict(mine["loader"])
        else:
            # Another TP/PP/DP layout: weights, optimizer and schedule reshard; per-rank streams
            # cannot. Same DP size: each DP rank takes its old data position (TP/PP peers share it).
            old = next(r for r in ranks if r["loader"]["dp_rank"] == self.dp_rank) \
                if saved_layout["data"] == self.dp_size else None
            if old is not None:
                self.train_loader.load_state_dict(old["loader"])
            else:
                # A fresh order (seed + step), so the new stream does not replay the first steps'.
                self.train_loader = self._loader("train", seed=self.cfg.data.seed + self.step)
                if self.rank == 0:
                    log.warning("resuming with data-parallel size %d (checkpoint: %d): loader positions cannot "
                                "be mapped across DP sizes; the data stream restarts in a new order (seed %d)",
                                self.dp_size, saved_layout["data"], self.cfg.data.seed + self.step)
        if self.rank == 0:
            log.info("resumed from %s (layout %s, now %s)", checkpoint.iter_name(step), saved_layout, self._layout())

    # -- training ---------------------------------------------------------------------------

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator).to(self.device, non_blocking=True)
        tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        output = model(tokens, self.positions.expand_as(tokens), None, labels=labels)
        return output, self._loss_func

    def _loss_func(self, per_token: torch.Tensor):
        # Megatron's 3-tuple convention: the schedule divides by the token count and the number
        # of micro-batches, so gradients are the mean over the global batch.
        total = per_token.float().sum()
        count = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
        return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

    def _mean_loss(self, store: list) -> float:
        """Mean token loss over the global batch, on every rank (the last PP stage holds it)."""
        from megatron.core import parallel_state

        sums = torch.zeros(2, device=self.device)
        if store and parallel_state.get_tensor_model_parallel_rank() == 0:
            for item in store:
                sums += item["lm loss"].to(sums.device)
        dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def _run_schedule(self, data_iterator, num_micro: int, *, forward_only: bool,
                      micro_batch_size: int | None = None) -> list:
        """num_micro micro-batches (of micro_batch_size windows, train.micro_batch_size unless
        given) through the schedule; the last stage's loss records.

        Every chunk reads the same micro-batches: with virtual stages each gets its own view of
        the iterator (itertools.tee), so the loader advances by num_micro whatever the layout."""
        t = self.cfg.train
        if len(self.model) == 1:
            model, data = self.model[0], data_iterator
        else:
            model, data = self.model, list(itertools.tee(data_iterator, len(self.model)))
        with self._steps_context():
            return self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=data, model=model,
                num_microbatches=num_micro, seq_length=t.seq_len,
                micro_batch_size=micro_batch_size or t.micro_batch_size, forward_only=forward_only)

    def train_step(self) -> tuple[float, float | None]:
        """One optimizer step over global_batch_size windows; returns (loss, grad norm)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        store = self._run_schedule(self.train_iter, self.num_micro, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        self.step += 1
        return self._mean_loss(store), grad_norm

    def _eval_batches(self) -> int:
        """Validation micro-batches: eval.batches, or what the valid split holds when less; a
        multiple of PP under the interleaved schedule (megatron's requirement)."""
        p = self.cfg.parallel
        batches = min(self.cfg.eval.batches, len(self.valid_loader))
        return batches - batches % p.pipeline if p.virtual_pipeline > 1 else batches

    @torch.no_grad()
    def evaluate(self) -> float:
        for chunk in self.model:
            chunk.eval()
        store = self._run_schedule(iter(self.valid_loader), self._eval_batches(), forward_only=True,
                                   micro_batch_size=self.eval_micro_batch)
        for chunk in self.model:
            chunk.train()
        return self._mean_loss(store)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1 if self.stop_signal else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        start, t0 = self.step, time.perf_counter()
        self.metrics.start(self.step)
        first_val = last_val = None
        if self.valid_loader is not None and self.step == 0:   # the starting point of the curve
            first_val = last_val = self.evaluate()
            self.metrics.eval(0, first_val)
            self.metrics.exclude(time.perf_counter() - t0)
        stopped = False
        while self.step < t.max_steps:
            loss, grad_norm = self.train_step()
            # Every rank holds the same (all-reduced) loss and grad norm; a NaN grad norm made NaN weights.
            bad = next((f"{name} is {v}" for name, v in (("loss", loss), ("grad norm", grad_norm))
                        if v is not None and not math.isfinite(v)), None)
            if bad:
                raise UserError(f"{bad} at step {self.step}; training diverged (this step is not saved): "
                                "lower optim.lr, raise schedule.warmup_steps or check the model.* values")
            last = self.step == t.max_steps
            rec = {"step": self.step, "loss": loss, "grad_norm": grad_norm,
                   "lr": self.optimizer.param_groups[0]["lr"]}
            if self.step % cfg.log.every == 0 or last or self.step == start + 1:
                rec = self.metrics.train(self.step, loss=loss, lr=rec["lr"], grad_norm=grad_norm,
                                         memory=memory_gb(self.device))
            t_other = time.perf_counter()
            if self.valid_loader is not None and (self.step % cfg.eval.every == 0 or last):
                val = self.evaluate()
                rec.update(self.metrics.eval(self.step, val))
                first_val = val if first_val is None else first_val
                last_val = val
            self.history.append(rec)
            stopped = self._stop_requested()
            every = cfg.checkpoint.save_every
            if last or stopped or (every and self.step % every == 0):
                self.save()
            self.metrics.exclude(time.perf_counter() - t_other)
            if stopped:
                break
        self._summary(start, time.perf_counter() - t0, first_val, last_val, stopped)

    def _summary(self, start: int, seconds: float, first_val, last_val, stopped: bool) -> None:
        if self.rank != 0:
            return
        import math

        t = self.cfg.train
        done = self.step - start
        rows = [("steps", f"{start} -> {self.step} of {t.max_steps}" + (
                    f" (stopped by {signal.Signals(self.stop_signal).name}; rerun to resume)" if stopped else "")),
                ("tokens", f"{done * t.global_batch_size * t.seq_len:,} in {seconds:.1f}s "
                           f"({done * t.global_batch_size * t.seq_len / max(seconds, 1e-9):,.0f} tok/s)"),
                ("loss", f"{self.history[0]['loss']:.4f} -> {self.history[-1]['loss']:.4f}" if self.history else "-")]
        if first_val is not None:
            rows.append(("val perplexity", f"{math.exp(first_val):.2f} -> {math.exp(last_val):.2f}"))
        if self.metrics.last.get("mfu") is not None:
            rows.append(("MFU", f"{100 * self.metrics.last['mfu']:.1f}%"))
        rows += [("parameters", f"{self.params['total']:,}"),
                 ("checkpoint", str(self.root / checkpoint.iter_name(self.step)))]
        summary("domainlm pretrain", rows)

    def close(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)
        if self.metrics is not None:
            self.metrics.close()
        for loader in (self.train_loader, self.valid_loader):
            if loader is not None and hasattr(loader, "close"):
                loader.close()
        if getattr(self, "device", None) is not None:
            rng.close(self.device.type)
        if self._owns_process_group and dist.is_initialized():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
            self._owns_process_group = False


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but CUDA is not available; use --train.device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _check_shards_tokenizer(shards: list[str], tok) -> None:
    """Refuse shards made with another tokenizer, from their manifests (before any compute)."""
    for path in shards:
        check_same(open_shards_dir(path).tokenizer_id, tok.identity, what=f"data.shards {path!r}",
                   mine_label=f"tokenizer {str(tok.path)!r}",
                   fix="give the tokenizer the shards were made with, or reshard")


def cuda_connections(cfg: PretrainConfig, device_type: str, env) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 for tensor-parallel GPU runs, before CUDA starts.

    megatron-core's tensor-parallel layers overlap their all-reduce / all-gather of the input
    gradient (and, with sequence parallelism, of the activations) with the weight-gradient GEMM,
    and rely on one hardware queue to launch the communication first
    (tensor_parallel/layers.py, LinearWithGradAccumulationAndAsyncCommunication). Read when the
    CUDA context is created, so it must be in the environment before the first CUDA call; a
    value set by the user is kept, with a warning when it is not 1.
    """
    if device_type != "cuda" or cfg.parallel.tensor == 1:
        return
    have = env.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if have is None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        if torch.cuda.is_initialized():
            log.warning("CUDA_DEVICE_MAX_CONNECTIONS=1 set after CUDA started in this process; it takes "
                        "effect in new processes only (set it before launching)")
    elif have != "1":
        log.warning("CUDA_DEVICE_MAX_CONNECTIONS=%s: tensor parallelism overlaps its communication only "
                    "with 1 (megatron-core); unset it or set it to 1", have)
