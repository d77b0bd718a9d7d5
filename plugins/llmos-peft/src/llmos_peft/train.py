"""The training loop: AdamW, a linear schedule with warm-up, and nothing hidden.

Each epoch visits the train rows in an order drawn from its own generator
(seeded by the job's seed and the epoch), so the order does not depend on
what else drew random numbers, and a run resumed mid-epoch picks up the same
order at the same batch. A checkpoint holds every generator's state, the
optimizer's and the scheduler's: a resumed run takes exactly the steps an
uninterrupted one would have (on the same device), and ends with the same
weights.

``should_stop`` is polled before every step and every evaluation batch; when
it turns true a checkpoint is written and :class:`~llmos_peft.errors.Cancelled`
raised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import torch

from llmos.errors import LlmosError
from llmos_peft import checkpoints
from llmos_peft.checkpoints import Progress
from llmos_peft.data import IGNORE, Collator, Example
from llmos_peft.errors import Cancelled
from llmos_peft.metrics import accuracy, macro_f1
from llmos_peft.options import Resolved

__all__ = ["Loop", "greater_is_better"]

log = structlog.get_logger("llmos.peft")


def greater_is_better(metric: str) -> bool:
    return not metric.endswith(("loss", "perplexity"))


@attrs.define(kw_only=True, slots=False)
class Loop:
    """One job's training: built once, :meth:`run` once."""

    model: Any
    method: str
    sft: bool
    hp: Resolved
    train: Sequence[Example]
    dev: Sequence[Example]
    collator: Collator
    device: torch.device
    seed: int
    fingerprint: str
    checkpoint_dir: Path | None
    report: Callable[[Mapping[str, Any]], None]
    should_stop: Callable[[], bool]
    progress: Progress = attrs.field(init=False)
    resumed_from: int | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.progress = Progress(fingerprint=self.fingerprint)
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise LlmosError(f"{self.method}: the model has no trainable weights")
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.params],
            lr=self.hp["learning_rate"],
            weight_decay=self.hp["weight_decay"],
        )
        self.steps_per_epoch = math.ceil(len(self.train) / self.hp["batch_size"])
        self.total_steps = self.steps_per_epoch * self.hp["epochs"]
        from transformers import get_linear_schedule_with_warmup

        warmup = math.ceil(self.total_steps * self.hp["warmup_ratio"])
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)

    # ------------------------------------------------------------ state

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained weights by name (what checkpoints and best epochs keep)."""
        return {name: p for name, p in self.params}

    def set_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        missing = [name for name, _ in self.params if name not in weights]
        if missing:
            raise LlmosError(f"the checkpoint lacks weights the model trains: {missing[:3]}")
        with torch.no_grad():
            for name, p in self.params:
                p.copy_(weights[name])

    def _adalora(self) -> Any:
        return self.model.base_model if self.method == "adalora" else None

    def _trainer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": checkpoints.rng_state(),
        }
        if (adalora := self._adalora()) is not None:
            allocator = adalora.rankallocator
            config = adalora.peft_config[adalora.trainable_adapter_name]
            state["adalora"] = {
                "ipt": allocator.ipt,
                "exp_avg_ipt": allocator.exp_avg_ipt,
                "exp_avg_unc": allocator.exp_avg_unc,
                "rank_pattern": config.rank_pattern,
            }
        return state

    def _restore(self, snapshot: checkpoints.Snapshot) -> None:
        self.set_weights(snapshot.weights)
        self.optimizer.load_state_dict(snapshot.trainer["optimizer"])
        self.scheduler.load_state_dict(snapshot.trainer["scheduler"])
        if (adalora := self._adalora()) is not None:
            saved = snapshot.trainer["adalora"]
            allocator = adalora.rankallocator
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                setattr(allocator, key, {k: v.to(self.device) for k, v in saved[key].items()})
            adalora.peft_config[adalora.trainable_adapter_name].rank_pattern = saved["rank_pattern"]
        checkpoints.restore_rng(snapshot.trainer["rng"])
        self.progress = snapshot.progress
        self.resumed_from = snapshot.progress.step

    def checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        path = checkpoints.save(
            self.checkpoint_dir,
            self.weights(),
            self._trainer_state(),
            self.progress,
            keep=self.hp["save_total_limit"],
        )
        log.info("peft.checkpoint", method=self.method, step=self.progress.step, path=str(path))

    def _stop(self) -> None:
        self.checkpoint()
        log.info("peft.cancelled", method=self.method, step=self.progress.step)
        raise Cancelled(self.progress.step)

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], split: str) -> dict[str, float]:
        """Scores of the current weights on ``examples``, keyed ``<split>/<score>``."""
        if not examples:
            return {}
        self.model.eval()
        size = self.hp["eval_batch_size"]
        gold: list[int] = []
        predicted: list[int] = []
        loss_sum, weight = 0.0, 0
        for at in range(0, len(examples), size):
            if self.should_stop():
                self._stop()
            batch = self._on_device(self.collator(examples[at : at + size]))
            labels = batch.pop("labels")
            # the task's loss from the logits: the model's own may add a
            # method's regularizer (AdaLoRA's), which is no score
            logits = self.model(**batch).logits.float()
            if self.sft:
                # prompt tuning returns logits for its virtual tokens first
                logits = logits[:, -labels.shape[1] :]
                targets = labels[:, 1:]
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                weight += int((targets != IGNORE).sum())
            else:
                losses = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
                weight += int(labels.shape[0])
                gold.extend(labels.tolist())
                predicted.extend(logits.argmax(dim=-1).tolist())
            loss_sum += float(losses)
        self.model.train()
        loss = loss_sum / max(weight, 1)
        if self.sft:
            return {f"{split}/loss": loss, f"{split}/perplexity": math.exp(min(loss, 700.0))}
        return {
            f"{split}/accuracy": accuracy(gold, predicted),
            f"{split}/macro_f1": macro_f1(gold, predicted),
            f"{split}/loss": loss,
        }

    # ------------------------------------------------------------ training

    def _on_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train), generator=generator).tolist()

    def _step(self, batch: Mapping[str, torch.Tensor]) -> float:
        loss = self.model(**self._on_device(batch)).loss
        if not torch.isfinite(loss):
            raise LlmosError(
                f"{self.method}: the loss became {float(loss)} at step {self.progress.step + 1};"
                " lower the learning_rate"
            )
        loss.backward()
        if self.hp["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.hp["max_grad_norm"])
        self.optimizer.step()
        self.scheduler.step()
        if (adalora := self._adalora()) is not None:
            # reads the gradients: after the step, before they are cleared
            adalora.update_and_allocate(self.progress.step)
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _epoch_end(self, epoch: int) -> bool:
        """Evaluate, keep the best weights, checkpoint; whether to stop early."""
        progress = self.progress
        figures: dict[str, Any] = {"epoch": epoch + 1, "step": progress.step}
        if progress.epoch_steps:
            figures["train/loss"] = progress.epoch_loss / progress.epoch_steps
        stop_early = False
        if self.dev:
            figures.update(self.evaluate(self.dev, "dev"))
            metric = self.hp["metric"]
            score = float(figures[metric])
            delta = self.hp["min_delta"]
            better = progress.best_score is None or (
                score > progress.best_score + delta
                if greater_is_better(metric)
                else score < progress.best_score - delta
            )
            if better:
                progress.best_score, progress.best_epoch, progress.bad_epochs = score, epoch + 1, 0
                if self.hp["load_best"] and self.checkpoint_dir is not None:
                    progress.best_weights = checkpoints.save_best(
                        self.checkpoint_dir, self.weights(), epoch + 1
                    )
                elif self.hp["load_best"]:
                    self._best_in_memory = {name: p.detach().clone() for name, p in self.params}
            else:
                progress.bad_epochs += 1
            patience = self.hp["early_stopping_patience"]
            stop_early = patience is not None and progress.bad_epochs >= patience
        progress.history.append(figures)
        progress.epochs_done = epoch + 1
        progress.epoch_loss, progress.epoch_steps = 0.0, 0
        progress.stopped_early = stop_early
        self.checkpoint()
        self.report({"total_steps": self.total_steps, **figures})
        return stop_early

    def run(self) -> Progress:
        """Train (resuming from the latest checkpoint, if any) and return where it ended."""
        latest = checkpoints.latest(self.checkpoint_dir) if self.checkpoint_dir else None
        if latest is not None:
            self._restore(checkpoints.load(latest, self.fingerprint))
            log.info("peft.resumed", method=self.method, step=self.progress.step)
        progress = self.progress
        self.model.train()
        if self.dev and not progress.history:  # where the base starts: epoch 0
            figures = {"epoch": 0, "step": 0, **self.evaluate(self.dev, "dev")}
            progress.history.append(figures)
            self.report({"total_steps": self.total_steps, **figures})
        if progress.stopped_early:
            return progress
        size, report_every = self.hp["batch_size"], self.hp["report_steps"]
        started, first_step = time.perf_counter(), progress.step
        window: list[float] = []
        for epoch in range(progress.epochs_done, self.hp["epochs"]):
            order = self._order(epoch)
            for index in range(self.steps_per_epoch):
                if epoch * self.steps_per_epoch + index < progress.step:
                    continue  # done before the checkpoint this run resumed from
                if self.should_stop():
                    self._stop()
                rows = [self.train[i] for i in order[index * size : (index + 1) * size]]
                rate = self.scheduler.get_last_lr()[0]
                loss = self._step(self.collator(rows))
                progress.step += 1
                progress.epoch_loss += loss
                progress.epoch_steps += 1
                window.append(loss)
                if progress.step % report_every == 0 or index == self.steps_per_epoch - 1:
                    elapsed = time.perf_counter() - started
                    done = progress.step - first_step
                    self.report(
                        {
                            "step": progress.step,
                            "total_steps": self.total_steps,
                            "epoch": progress.step / self.steps_per_epoch,
                            "loss": sum(window) / len(window),
                            "learning_rate": rate,
                            "samples_per_s": done * size / elapsed if elapsed > 0 else 0.0,
                            "eta_s": elapsed / done * (self.total_steps - progress.step),
                        }
                    )
                    window.clear()
                save_steps = self.hp["save_steps"]
                if save_steps and progress.step % save_steps == 0:
                    self.checkpoint()
            if self._epoch_end(epoch):
                log.info("peft.stopped_early", method=self.method, epoch=epoch + 1)
                break
        return progress

    def restore_best(self) -> bool:
        """Put back the best dev epoch's weights (``load_best``); whether it did."""
        progress = self.progress
        if not self.hp["load_best"] or progress.best_epoch is None:
            return False
        if progress.best_epoch == progress.epochs_done:
            return True  # the weights in hand are the best
        if progress.best_weights is not None and self.checkpoint_dir is not None:
            self.set_weights(checkpoints.load_weights(self.checkpoint_dir / progress.best_weights))
            return True
        best = getattr(self, "_best_in_memory", None)
        if best is not None:
            self.set_weights(best)
            return True
        return False
