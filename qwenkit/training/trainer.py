"""The LoRA SFT loop: AdamW with warmup and cosine decay, gradient accumulation, eval, checkpoints.

The loss of an optimizer step is the mean over every trained token of its global batch. Each
micro-batch's summed token loss is divided by that global count before backward, so gradient
accumulation and data-parallel processes add up to the gradient of one big batch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qwenkit.errors import QwenkitError
from qwenkit.lora.attach import adapter_parameters, adapter_weights, add_new_adapter
from qwenkit.lora.peft_format import LoraConfig, read_adapter, save_adapter
from qwenkit.model.adapters import LoraRouting
from qwenkit.model.attention import PackedSequences
from qwenkit.training.data import IGNORE_INDEX, Example
from qwenkit.distributed import ProcessGroup
from qwenkit.training.packing import Batch, PackedRow, pack

ADAPTER = "default"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "trainer_log.jsonl"


@dataclass
class TrainingConfig:
    output_dir: Path
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_length: int = 1024
    packing: bool = True
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 1  # packed rows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step, per process
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps; 0: at the end only
    save_every: int = 0  # steps; 0: at the end only
    seed: int = 0
    gradient_checkpointing: bool = False


@dataclass
class StepLog:
    step: int
    loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_second: float
    eval_loss: float | None = None


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor: linear from 0 over `warmup` steps, then half a cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


class LoraTrainer:
    def __init__(self, loaded, config: TrainingConfig, train: list[Example], evaluation: list[Example] | None = None,
                 group: ProcessGroup = ProcessGroup()):
        self.model = loaded.model
        self.config = config
        self.group = group
        self.model.gradient_checkpointing = config.gradient_checkpointing
        add_new_adapter(self.model, ADAPTER, config.lora, config.seed)
        self.routing = LoraRouting.all(ADAPTER)
        self.params = adapter_parameters(self.model, ADAPTER)
        for p in self.params:
            p.requires_grad_(True)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed)).tolist()
        self.rows = pack([train[i] for i in order], config.max_length, config.packing)
        self.eval_rows = pack(evaluation, config.max_length, config.packing) if evaluation else []
        self.rows_per_step = config.batch_size * config.grad_accum * group.world_size
        self.steps_per_epoch = math.ceil(len(self.rows) / self.rows_per_step)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(config.warmup_steps, self.total_steps)
        )
        self.step = 0
        self.history: list[StepLog] = []
        self.initial_eval_loss: float | None = None  # the base model's, measured before the first step
        # Dropout differs per process, as each process sees different rows.
        torch.manual_seed(config.seed + group.rank)

    # ---- data -----------------------------------------------------------------------------------

    def global_batch(self, step: int) -> list[PackedRow]:
        """The rows of optimizer step `step`: epochs reshuffle the packed rows with their own seed."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.config.seed + 1 + epoch))
        chosen = order[index * self.rows_per_step : (index + 1) * self.rows_per_step].tolist()
        return [self.rows[i] for i in chosen]

    def _micro_batches(self, rows: list[PackedRow]) -> list[Batch]:
        mine = rows[self.group.rank :: self.group.world_size]
        size = self.config.batch_size
        return [Batch.of(mine[i : i + size]) for i in range(0, len(mine), size)]

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        hidden = self.model(batch.token_ids, batch.positions, PackedSequences(batch.lengths, batch.positions), self.routing)
        trained = batch.targets != IGNORE_INDEX
        # Logits only where a token is predicted: the vocabulary is large, the trained share often small.
        logits = self.model.compute_logits(hidden[trained], self.routing)
        return F.cross_entropy(logits, batch.targets[trained], reduction="sum")

    # ---- steps ----------------------------------------------------------------------------------

    def train_step(self) -> StepLog:
        start = time.perf_counter()
        rows = self.global_batch(self.step)
        num_targets = sum(r.num_targets for r in rows)
        self.model.train()
        total = torch.zeros(1)
        for batch in self._micro_batches(rows):
            loss = self._loss_sum(batch)
            (loss / num_targets).backward()
            total += loss.detach()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.group.sum_(grads + [total])
        for p, g in zip(self.params, grads):
            p.grad = g
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(len(r.token_ids) for r in rows)
        log = StepLog(self.step, total.item() / num_targets, learning_rate, grad_norm.item(),
                      tokens / (time.perf_counter() - start))
        self.history.append(log)
        return log

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per trained token over the eval set (all processes together)."""
        self.model.eval()
        totals = torch.zeros(2)
        for row in self.eval_rows[self.group.rank :: self.group.world_size]:
            totals[0] += self._loss_sum(Batch.of([row]))
            totals[1] += row.num_targets
        self.group.sum_([totals])
        return (totals[0] / totals[1]).item()

    def train(self, progress: bool = True) -> list[StepLog]:
        cfg = self.config
        self._rewrite_log()
        if self.eval_rows and self.step == 0:
            self.initial_eval_loss = self.evaluate()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (progress and self.group.is_main),
                   desc="tune", unit="step", dynamic_ncols=True)
        while self.step < self.total_steps:
            log = self.train_step()
            last = self.step == self.total_steps
            if self.eval_rows and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                log.eval_loss = self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                self.save_checkpoint(cfg.output_dir / f"checkpoint-{self.step}")
            bar.update(1)
            bar.set_postfix(loss=f"{log.loss:.4f}", tok_s=f"{log.tokens_per_second:.0f}",
                            **({"eval": f"{log.eval_loss:.4f}"} if log.eval_loss is not None else {}))
            self._append_log(log)
        bar.close()
        self.save_adapter(cfg.output_dir)
        return self.history

    # ---- files ----------------------------------------------------------------------------------

    def save_adapter(self, directory: Path) -> None:
        if self.group.is_main:
            save_adapter(directory, self.config.lora, adapter_weights(self.model, ADAPTER))
        self.group.barrier()

    def _rewrite_log(self) -> None:
        """The log holds this run's steps: none when starting, the checkpoint's when resuming."""
        if self.group.is_main:
            self.config.output_dir.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(asdict(h)) + "\n" for h in self.history)
            (self.config.output_dir / LOG_FILE).write_text(lines)

    def _append_log(self, log: StepLog) -> None:
        if self.group.is_main:
            self.config.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.config.output_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(asdict(log)) + "\n")

    def save_checkpoint(self, directory: Path) -> None:
        """The adapter plus everything needed to continue exactly: optimizer, schedule, step, RNG."""
        if self.group.is_main:
            save_adapter(directory, self.config.lora, adapter_weights(self.model, ADAPTER))
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "history": [asdict(h) for h in self.history]},
                       directory / STATE_FILE)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(torch.get_rng_state(), directory / f"rng_state_{self.group.rank}.pt")
        self.group.barrier()

    def load_checkpoint(self, directory: Path) -> None:
        if not (directory / STATE_FILE).is_file():
            raise QwenkitError(f"{directory} is not a training checkpoint ({STATE_FILE} is missing)")
        adapter = read_adapter(directory)
        current = adapter_weights(self.model, ADAPTER)
        if set(adapter.weights) != set(current):
            raise QwenkitError(f"the checkpoint in {directory} targets other modules than this run's LoRA settings")
        with torch.no_grad():
            for name, (a, b) in adapter.weights.items():
                if a.shape != current[name][0].shape:
                    raise QwenkitError(f"the checkpoint's LoRA rank ({a.shape[0]}) differs from this run's")
                current[name][0].copy_(a)
                current[name][1].copy_(b)
        state = torch.load(directory / STATE_FILE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.history = [StepLog(**h) for h in state["history"]]
        rng = directory / f"rng_state_{self.group.rank}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=False))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)
