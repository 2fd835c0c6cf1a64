"""`qwenkit tune`: LoRA supervised fine-tuning, writing a PEFT-format adapter.

Data-parallel: `torchrun --standalone --nproc-per-node N -m qwenkit.cli.main tune ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHORT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="LoRA fine-tuning on chat JSONL data (PEFT-format adapter)")
    p.add_argument("--model", "-m", default=None, help="base checkpoint: directory, .gguf or hub id (default: the embedded model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--data", required=True, help='JSONL of {"messages": [...]} or {"prompt": ..., "completion": ...}')
    p.add_argument("--eval", default=None, help="JSONL evaluated every --eval-every steps and at the end")
    p.add_argument("--out", required=True, help="output directory for the adapter, checkpoints and log")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default="q,k,v,o", help="comma-separated module names, or all-linear")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per packed row; longer examples are truncated")
    p.add_argument("--no-packing", action="store_true", help="one example per row")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=1, help="packed rows per micro-batch, per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step, per process")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint directory (default: the latest in --out)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def parse_targets(text: str) -> list[str] | str:
    if text == "all-linear":
        return text
    targets = [SHORT_TARGETS.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
    if not targets:
        from qwenkit.errors import QwenkitError

        raise QwenkitError("--targets names no module")
    return targets


def run(args: argparse.Namespace) -> int:
    from qwenkit.errors import QwenkitError
    from qwenkit.lora.peft_format import LoraConfig
    from qwenkit.training.data import load_dataset
    from qwenkit.distributed import ProcessGroup
    from qwenkit.training.trainer import LoraTrainer, TrainingConfig, latest_checkpoint
    from qwenkit.weights.loader import load_model

    for flag in ("rank", "batch_size", "grad_accum", "max_length", "epochs"):
        if getattr(args, flag) < 1:
            raise QwenkitError(f"--{flag.replace('_', '-')} must be at least 1")
    out = Path(args.out)
    group = ProcessGroup.from_environment()
    try:
        loaded = load_model(args.model, args.dtype)
        lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                          target_modules=parse_targets(args.targets), base_model_name_or_path=str(loaded.path))
        train = load_dataset(Path(args.data), loaded.tokenizer, args.max_length)
        evaluation = load_dataset(Path(args.eval), loaded.tokenizer, args.max_length) if args.eval else None
        config = TrainingConfig(
            output_dir=out, lora=lora, max_length=args.max_length, packing=not args.no_packing, epochs=args.epochs,
            max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.lr,
            warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
            eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        trainer = LoraTrainer(loaded, config, train.examples, evaluation.examples if evaluation else None, group)
        if args.resume is not None:
            checkpoint = latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
            if checkpoint is None:
                raise QwenkitError(f"--resume: no checkpoint-* directory with a trainer state in {out}")
            trainer.load_checkpoint(checkpoint)
        if group.is_main:
            print(f"{len(train.examples)} examples ({train.num_truncated} truncated, {train.num_dropped} dropped) "
                  f"in {len(trainer.rows)} rows; {trainer.total_steps} steps of {trainer.rows_per_step} rows; "
                  f"{sum(p.numel() for p in trainer.params):,} trainable parameters", file=sys.stderr)
        history = trainer.train(progress=not args.no_progress)
    finally:
        group.close()
    if group.is_main and history:
        last = history[-1]
        speed = sum(h.tokens_per_second for h in history) / len(history)
        evaluated = [h.eval_loss for h in history if h.eval_loss is not None]
        before = f"{trainer.initial_eval_loss:.4f} -> " if trainer.initial_eval_loss is not None else ""
        print(f"step {last.step}: loss {last.loss:.4f}" + (f", eval loss {before}{evaluated[-1]:.4f}" if evaluated else "")
              + f", {speed:.0f} tokens/s; adapter written to {out}", file=sys.stderr)
    return 0
