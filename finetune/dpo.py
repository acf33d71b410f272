"""`domainlm finetune dpo`: preference tuning (DPO, IPO) on chosen/rejected pairs, in our loop.

The loss, from the papers and as TRL's `DPOTrainer` computes it (tests/test_dpo.py checks the two
agree on the same batch within 1e-5):

    log-ratio(y) = log pi(y | x) - log pi_ref(y | x)      (summed over the reply's tokens)
    sigmoid (DPO, Rafailov et al. 2023):  -log sigmoid(beta (log-ratio(chosen) - log-ratio(rejected)))
    ipo (Azar et al. 2023):  (log-ratio(chosen) / |chosen| - log-ratio(rejected) / |rejected| - 1 / (2 beta))^2

with the implicit rewards beta x log-ratio, their margin (chosen - rejected) and the accuracy
(chosen reward > rejected reward) logged per step and on the held-out pairs.

The reference is the starting policy: the base with the --adapter it starts from (or the base
alone for a new adapter). Its log-probabilities of every pair are computed once, in eval mode,
when the run sets up, from the model as built and before any checkpoint is loaded, so a resumed
run has the same reference without storing it; dropout is off (as TRL's `disable_dropout`), so at
step 0 policy = reference and the loss is log 2.

Why our loop (the SFT trainer's, `trainer.py`) and not TRL's `DPOTrainer`: the SFT trainer's
exact resume (the data position a function of the step; tested with a kill), its loss normalized
once per step over every micro-batch and process, its checks before and after training (points,
held-out QA) and its output contract, which DPO shares as it is; and a reference that is the SFT
adapter, not the base: TRL's PEFT path disables the adapter for the reference (the base), or
needs the adapter loaded twice. TRL stays the reference implementation the loss is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from domainlm import stages
from domainlm.errors import UserError
from domainlm.finetune.batches import Batches, collate
from domainlm.finetune.chat import IGNORE
from domainlm.finetune.trainer import Trainer
from domainlm.progress import log

LOG2 = math.log(2.0)


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, *, beta: float, loss: str, chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward); rewards are beta x log-ratio, detached."""
    chosen_ratio = chosen_logps - ref_chosen
    rejected_ratio = rejected_logps - ref_rejected
    if loss == "sigmoid":
        per = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        per = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss {loss!r}")
    return per, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class PairBatches(Batches):
    """The step-indexed stream of `batches.Batches` over pairs: an item is a pair, a micro-batch
    holds its pairs' chosen rows then their rejected rows (right-padded), and a step's count is
    its number of pairs (the loss is the mean over the step's pairs)."""

    def __init__(self, pairs, *, global_batch: int, micro_batch: int, seed: int, pad_id: int):
        super().__init__(pairs, global_batch=global_batch, micro_batch=micro_batch, seed=seed, packing=False,
                         seq_len=0, pad_id=pad_id, lengths=[len(p.chosen.ids) + len(p.rejected.ids) for p in pairs],
                         counts=[1] * len(pairs))

    def collate(self, items):
        return collate_pairs([self.samples[i] for item in items for i in item], self.pad_id)


def collate_pairs(pairs, pad_id: int):
    """(micro-batch of the chosen rows then the rejected rows, the pairs' indices)."""
    mb = collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], pad_id, packed=False)
    return mb, torch.tensor([p.index for p in pairs], dtype=torch.long)


def supervised_per_row(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE).sum(dim=1)


class DPOTrainer(Trainer):
    stage = stages.FINETUNE_DPO

    # -- setup ---------------------------------------------------------------------------------

    def _chat_template(self) -> str:
        """The starting adapter's template (what it was trained with), else the model's."""
        self.start_adapter = None
        if self.cfg.adapter:
            from domainlm.finetune.adapter import ADAPTER_WEIGHTS, open_adapter_dir
            from domainlm.pretrain.convert.hfdir import check_safetensors

            ad = open_adapter_dir(self.cfg.adapter)
            check_safetensors(ad.path / ADAPTER_WEIGHTS)
            ad.check_base(self.hf)
            if ad.method not in ("lora", "dora"):
                raise UserError(f"adapter {self.cfg.adapter!r} is a {ad.method} adapter; finetune dpo continues LoRA "
                                "or DoRA adapters (merge it first and give the merged dir as --model)")
            self.start_adapter = ad
            if ad.chat_template and not self.cfg.chat_template:
                from domainlm.finetune.chat import check_template

                check_template(ad.chat_template, f"the chat template of adapter {self.cfg.adapter!r}",
                               "fix it, or give a template file with --chat-template")
                return ad.chat_template
        return super()._chat_template()

    def _prepare_data(self):
        from domainlm.finetune import pairs

        return pairs.prepare(self.cfg, self.encoder, self.hf.max_positions)

    def _make_batches(self) -> None:
        t, e = self.cfg.train, self.cfg.eval
        self.batches = PairBatches(self.data.train, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
                                   seed=t.seed, pad_id=self.pad)
        self.valid = self._in_order(self.data.valid[: e.valid_batches * t.micro_batch_size])

    def _in_order(self, pairs) -> list:
        """Micro-batches of `pairs` in their order (validation, the reference pass)."""
        m = self.cfg.train.micro_batch_size
        return [collate_pairs(pairs[j:j + m], self.pad) for j in range(0, len(pairs), m)]

    def _build(self, modeling) -> None:
        super()._build(modeling)
        for m in self.peft_model.modules():          # TRL's disable_dropout: policy == reference at step 0
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if self.kernel_counts is not None and self.rank == 0:
            log.info("kernels: DPO scores each reply's tokens, so the output layer runs unfused")
        self.ref_train = self.reference(self._in_order(self.data.train), len(self.data.train), "reference (train pairs)")
        self.ref_valid = self.reference(self.valid, len(self.data.valid), "reference (valid pairs)")

    @torch.no_grad()
    def reference(self, micro_batches, n: int, desc: str) -> torch.Tensor:
        """[n, 2] log-probabilities (chosen, rejected) of the starting policy, eval mode."""
        from domainlm.progress import progress

        out = torch.zeros((n, 2), dtype=torch.float64)
        was = self.loss_model.training
        self.loss_model.eval()
        bar = progress(total=n, desc=desc, unit="pair")
        for mb, idx in micro_batches:
            mb = mb.to(self.device)
            with self.autocast():
                nll = self.loss_model(mb.input_ids, mb.labels, mb.attention_mask, mb.position_ids, per_row=True)
            m = len(idx)
            out[idx, 0] = -nll[:m].double().cpu()
            out[idx, 1] = -nll[m:].double().cpu()
            bar.update(m)
        bar.close()
        self.loss_model.train(was)
        return out

    # -- training ------------------------------------------------------------------------------

    def _pairs(self, nll: torch.Tensor, mb, ref: torch.Tensor):
        m = nll.shape[0] // 2
        logps = -nll
        counts = supervised_per_row(mb.labels)
        ref = ref.to(logps.device, logps.dtype)
        per, rc, rr = preference_loss(logps[:m], logps[m:], ref[:, 0], ref[:, 1], beta=self.cfg.beta,
                                      loss=self.cfg.loss, chosen_tokens=counts[:m], rejected_tokens=counts[m:])
        return per, rc, rr, (logps[:m] - logps[m:]).detach()

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over the step's pairs; returns (mean pair loss, grad norm, tokens)."""
        import torch.distributed as dist

        self.loss_model.train()
        micro, pairs = self.batches.step(self.step, self.rank, self.world)
        scale = self.world / pairs
        sums = torch.zeros(6, dtype=torch.float64)      # loss, tokens, margin, accuracy, chosen, rejected
        for j, (mb, idx) in enumerate(micro):
            mb = mb.to(self.device)
            with self._sync(j == len(micro) - 1), self.autocast():
                nll = self.model(mb.input_ids, mb.labels, mb.attention_mask, mb.position_ids, per_row=True)
            per, rc, rr, _ = self._pairs(nll, mb, self.ref_train[idx])
            (per.sum() * scale).backward()
            sums += torch.tensor([float(per.detach().sum()), float(mb.tokens), float((rc - rr).sum()),
                                  float((rc > rr).sum()), float(rc.sum()), float(rr.sum())], dtype=torch.float64)
        grad_norm = self._optimizer_step()
        if self.world > 1:
            both = sums.to(self.device)
            dist.all_reduce(both)
            sums = both.cpu()
        self.step_extra = {"margin": float(sums[2]) / pairs, "accuracy": float(sums[3]) / pairs,
                           "reward_chosen": float(sums[4]) / pairs, "reward_rejected": float(sums[5]) / pairs}
        return float(sums[0]) / pairs, grad_norm, int(sums[1])

    @torch.no_grad()
    def validate(self) -> float:
        """The held-out pairs' mean loss; their reward margin, accuracy and log-probability margin
        (chosen - rejected under the policy) in self.valid_pairs."""
        sums, n = torch.zeros(4, dtype=torch.float64), 0
        was = self.loss_model.training
        self.loss_model.eval()
        for mb, idx in self.valid:
            mb = mb.to(self.device)
            with self.autocast():
                nll = self.loss_model(mb.input_ids, mb.labels, mb.attention_mask, mb.position_ids, per_row=True)
            per, rc, rr, logp_margin = self._pairs(nll, mb, self.ref_valid[idx])
            sums += torch.tensor([float(per.sum()), float((rc - rr).sum()), float((rc > rr).sum()),
                                  float(logp_margin.sum())], dtype=torch.float64)
            n += len(idx)
        self.loss_model.train(was)
        n = max(n, 1)
        self.valid_pairs = {"pairs": n, "loss": float(sums[0]) / n, "margin": float(sums[1]) / n,
                            "accuracy": float(sums[2]) / n, "logp_margin": float(sums[3]) / n}
        return self.valid_pairs["loss"]

    def run_checks(self, when: str) -> dict:
        out = super().run_checks(when)
        if self.valid:
            out["pairs"] = dict(self.valid_pairs)
            if self.rank == 0:
                v = self.valid_pairs
                log.info("held-out pairs %s training: loss %.4f, reward margin %.4f, accuracy %.3f, log-prob margin "
                         "(chosen - rejected) %.3f", when, v["loss"], v["margin"], v["accuracy"], v["logp_margin"])
        return out

    # -- the output ----------------------------------------------------------------------------

    def extra_facts(self) -> dict:
        ad = self.start_adapter
        start = None
        if ad is not None:
            t = ad.manifest.get("training") or {}
            start = {"path": str(ad.path), "fingerprint": ad.manifest.get("fingerprint"), "method": ad.method,
                     "training_seconds": t.get("seconds"), "tokens": t.get("tokens")}
        return {"dpo": {"beta": self.cfg.beta, "loss": self.cfg.loss, "start_adapter": start,
                        "reference": "the starting policy (base + start adapter)" if ad else "the base model",
                        "step0_loss_expected": LOG2 if self.cfg.loss == "sigmoid" else
                        (1.0 / (2.0 * self.cfg.beta)) ** 2}}
