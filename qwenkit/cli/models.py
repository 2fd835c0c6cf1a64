"""`qwenkit models`: the models in the local caches; `--catalog`: the Qwen family, what each needs on
this machine, and which to pick for a task."""

from __future__ import annotations

import argparse

from qwenkit.weights.catalog import TASKS


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list cached models, or the Qwen family with its memory needs (--catalog)")
    p.add_argument("--catalog", action="store_true", help="the Qwen family: size, context, thinking, licence, memory here")
    p.add_argument("--task", choices=TASKS, default=None, help="with --catalog: only models for this task, and a recommendation")
    p.add_argument("--context", type=int, default=None, help="with --catalog: tokens of context to size the KV cache for (default 8192)")
    p.set_defaults(func=run)


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def run(args: argparse.Namespace) -> int:
    if args.task or args.context:
        args.catalog = True
    return show_catalog(args.task, args.context or 8192) if args.catalog else show_cached()


def show_cached() -> int:
    from qwenkit.weights.default_model import DEFAULT_MODEL, cache_dir
    from qwenkit.weights.hub import cached_models

    rows = []
    default = cache_dir() / DEFAULT_MODEL.filename
    if default.exists():
        rows.append(("(default) Qwen2.5-Coder-0.5B-Instruct", "gguf Q4_K_M", default.stat().st_size, default))
    rows += [(m.name + (" [modelscope]" if m.source == "modelscope" else ""), m.format, m.size, m.path) for m in cached_models()]
    if not rows:
        print("no cached models; download one with `qwenkit pull ID`")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'MODEL':<{width}}  {'FORMAT':<22} {'SIZE':>8}  PATH")
    for name, fmt, size, path in rows:
        print(f"{name:<{width}}  {fmt:<22} {_size(size):>8}  {path}")
    return 0


def show_catalog(task: str | None, context: int) -> int:
    from qwenkit.weights.catalog import CATALOG, RECOMMENDED, by_name
    from qwenkit.weights.memory import GIB, QUANTS, available_memory, estimate, fit_text, runtime_baseline

    baseline, available = runtime_baseline(), available_memory()
    models = [m for m in CATALOG if task is None or task in m.tasks]
    print(f"memory available here: {available / GIB:.1f} GiB (MemAvailable); needs at {context} tokens of context, "
          f"GGUF blocks in place (F16 runs as float32):")
    head = f"{'MODEL':<30} {'PARAMS':>12} {'CONTEXT':>13} {'THINKING':>8} {'MODAL':>15} {'LICENCE':<21}"
    print(head + "".join(f" {q:>18}" for q in QUANTS))
    for m in models:
        active = f"/{_params(m.shape.active_params)}" if m.shape.experts else ""
        ctx = f"{m.context // 1024}K" + (f"/{m.max_context // 1024}K" if m.max_context != m.context else "")
        cells = []
        for q in QUANTS:
            need = estimate(m.shape, q, min(context, m.max_context), baseline).total
            fit = "fits" if need <= available else f"+{(need - available) / GIB:.1f}"
            cells.append(f"{need / GIB:>6.1f} GiB {fit:>6}" if m.runs_in_qwenkit else f"{'-':>18}")
        print(f"{m.name:<30} {_params(m.params) + active:>12} {ctx:>13} {m.thinking:>8} {m.modalities:>15} {m.licence:<21}"
              + "".join(f" {c:>18}" for c in cells) + (f"  ({m.note})" if m.note else ""))
    print("fits: within MemAvailable; +N: needs N GiB more. CONTEXT: native/with YaRN (--rope-scaling). Recommended (Q4_K_M):")
    for t in [task] if task else list(RECOMMENDED):
        pick = None
        for name in RECOMMENDED[t]:
            m = by_name(name)
            need = estimate(m.shape, "Q4_K_M", min(context, m.max_context), baseline).total
            if need <= available:
                pick = m
                break
        if pick is None:
            print(f"{t}: nothing in the guide fits {available / GIB:.1f} GiB at Q4_K_M ({fit_text(need, available)} for the smallest)")
        elif not pick.runs_in_qwenkit:
            print(f"{t}: {pick.name} fits ({pick.note}); for text, see --task chat")
        else:
            need = estimate(pick.shape, "Q4_K_M", min(context, pick.max_context), baseline).total
            print(f"{t}: {pick.name} (Q4_K_M, {fit_text(need, available)}: {need / GIB:.1f} GiB)  ->  qwenkit chat -m {pick.pull_id}")
    return 0
