"""Does a LoRA adapter on the first decoder blocks help the server read the privatized prefix? (issue 13)

    veil bench distill-lora [--mu 10] [--steps 100] [--batch-size 4] [--rank 8] [--layers 4] [--fresh]

Two students are distilled at one level (projection smollm2-k72-noise-aware, n = 4, mu) on the served prompts'
data (`general` prose plus 48 synthesized chat examples), on the same budget: the same steps, batches, noise and
seed.
- "soft prompt": m = 32 virtual tokens alone, exactly as `veil train soft-prompt --objective distill`;
- "soft prompt + LoRA": the same, plus a LoRA adapter (PEFT) on the attention projections and the MLP of the
  first `--layers` decoder blocks, trained jointly. The teacher pass runs with the adapter disabled, so the
  teacher is the frozen base model; no base-model weight gets a gradient (checked after training).
Both are scored as floor.py scores a served prompt: 32 evenly spaced 64 + 64-token segments of Emma (held out of
all training) and of WikiText-2 test, one noise seed for every row. The clean prefix and nothing sent are the base
model's (adapter disabled); the prompt alone, the private path and the mismatched control go through the student
(adapter enabled). Context retained against the mismatched control, with its bootstrap SE over segments.

Resumable per student (each is saved when scored). Writes bench/results/distill-lora.json; `--save-dir DIR` also
keeps each student's prompt (safetensors) and adapter (PEFT `save_pretrained`).
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tqdm import tqdm

from app.model_runner import ModelRunner
from app.reconstruction import Projection
from app.training.config import training_segments
from app.training.floor import ROWS, check_segments, floor_report, path_nlls
from app.training.loop import LoopState, train_loop
from app.training.soft_prompt import SoftPromptConfig, init_from_text, private_prefix_loss, training_pool
from bench.cells import run_cells

RESULTS = Path(__file__).parent / "results" / "distill-lora.json"
PROJECTION = "smollm2-k72-noise-aware"
HELD_OUT = ("austen-emma", "wikitext-2-test")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_ROWS = ("clean prefix", "nothing sent")
"""Rows that are the base model's whatever the student: scored with the adapter disabled."""
ADAPTED_CLEAN = "clean prefix (adapter enabled)"
"""A diagnostic row of the LoRA student: how the adapter changes the model's reading of a clean prefix."""


def lora_config(rank: int, layers: int) -> LoraConfig:
    """LoRA of `rank` (alpha = 2 rank, no dropout) on attention and MLP of the first `layers` decoder blocks."""
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGET_MODULES),
                      layers_to_transform=list(range(layers)), task_type="CAUSAL_LM")


@contextmanager
def lora_student(runner: ModelRunner, config: LoraConfig, seed: int) -> Iterator[PeftModel]:
    """`runner.model` with a fresh LoRA adapter injected in place (only the adapter trainable); removed on exit."""
    runner.model.requires_grad_(False)
    torch.manual_seed(seed)  # the adapter's initialisation
    model = get_peft_model(runner.model, config)
    try:
        yield model
    finally:
        model.unload()


def train_student(runner: ModelRunner, projection: Projection, config: SoftPromptConfig, pool: torch.Tensor,
                  adapter: PeftModel | None = None, adapter_lr: float = 1e-3,
                  progress: str | None = None) -> tuple[torch.Tensor, LoopState]:
    """Distil a soft prompt (and `adapter`'s LoRA weights with it, at `adapter_lr`) on `pool`; returns the prompt
    and the loop's record. Raises if a weight other than those trained got a gradient."""
    if adapter is None:
        runner.model.requires_grad_(False)
    prompt = init_from_text(runner, config.init_text, config.virtual_tokens).requires_grad_(True)
    params: dict[str, torch.Tensor] = {"prompt_embeddings": prompt}
    lrs: dict[str, float] = {}
    teacher = nullcontext
    if adapter is not None:
        lora = {name: p for name, p in adapter.named_parameters() if adapter.base_model.prefix in name}  # "lora_"
        params, lrs, teacher = params | lora, dict.fromkeys(lora, adapter_lr), adapter.disable_adapter
    loss = private_prefix_loss(runner, projection, config, prompt, config.objective, teacher)
    bar = tqdm(total=config.steps, desc=progress, unit="step", disable=progress is None)

    def on_step(step: int, value: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")

    try:
        state = train_loop(params, loss, pool, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                           lrs=lrs, seed=config.seed, run_key=config.model_dump_json(), on_step=on_step)
    finally:
        bar.close()
    trained = {id(p) for p in params.values()}
    touched = [name for name, p in runner.model.named_parameters() if p.grad is not None and id(p) not in trained]
    if touched:
        raise RuntimeError(f"base-model weights got gradients: {', '.join(touched[:5])}")
    return prompt.detach(), state


def student_nlls(runner: ModelRunner, projection: Projection, config: SoftPromptConfig, prompt: torch.Tensor,
                 segments: torch.Tensor, adapter: PeftModel | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """floor.py's per-segment NLL rows for one student: BASE_ROWS with the adapter disabled, the others through it
    (plus ADAPTED_CLEAN for a LoRA student)."""
    def score() -> dict[str, np.ndarray]:
        return path_nlls(runner, projection, config.bits, config.mu, prompt, segments, config.prefix_tokens, seed)

    if adapter is None:
        return score()
    with adapter.disable_adapter():
        base = score()
    adapted = score()
    return {**{row: base[row] if row in BASE_ROWS else adapted[row] for row in ROWS},
            ADAPTED_CLEAN: adapted["clean prefix"]}


def run(runner: ModelRunner, projection: Projection, config: SoftPromptConfig, adapter: LoraConfig,
        adapter_lr: float, text: str, chat: torch.Tensor | None, held_out: dict[str, str], results_path: Path, *,
        segments: int = 32, seed: int = 0, fresh: bool = False, save_dir: Path | None = None,
        plan: dict | None = None) -> dict:
    """Train and score both students (resumably, into `results_path`); prints and returns the results, with the
    markdown table under `"table"`."""
    train, _ = training_segments(text, runner.tokenizer, config)
    pool = training_pool(train, chat)
    checks = {data: check_segments(t, runner.tokenizer, config.prefix_tokens, config.continuation_tokens, segments)
              for data, t in held_out.items()}

    def student(with_lora: bool) -> dict:
        name = "soft prompt + LoRA" if with_lora else "soft prompt"
        with lora_student(runner, adapter, config.seed) if with_lora else nullcontext() as model:
            started = time.perf_counter()
            prompt, state = train_student(runner, projection, config, pool, model, adapter_lr, progress=name)
            seconds = time.perf_counter() - started
            scores = {data: floor_report(student_nlls(runner, projection, config, prompt, sample, model, seed), data)
                      for data, sample in checks.items()}
            if save_dir is not None:
                save(save_dir / ("prompt-lora" if with_lora else "prompt"), prompt, model)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model else 0
        return {"trainable_parameters": int(prompt.numel() + trainable), "train_seconds_per_step": seconds / config.steps,
                "loss_curve": state.losses, "scores": scores}

    plan = {**(plan or {}), "config": config.model_dump(), "adapter": adapter_record(adapter),
            "adapter_lr": adapter_lr, "train_segments": len(train), "pool": len(pool), "segments": segments,
            "seed": seed}
    results = run_cells(results_path, plan, [("soft prompt", lambda: student(False)),
                                             ("soft prompt + LoRA", lambda: student(True))],
                        fresh=fresh, desc="distill-lora")
    results["table"] = table(results)
    print(results["table"])
    return results


def adapter_record(adapter: LoraConfig) -> dict:
    return {"rank": adapter.r, "alpha": adapter.lora_alpha, "dropout": adapter.lora_dropout,
            "target_modules": sorted(adapter.target_modules), "layers": list(adapter.layers_to_transform)}


def save(directory: Path, prompt: torch.Tensor, adapter: PeftModel | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": prompt.contiguous().cpu()}, str(directory / "prompt.safetensors"))
    if adapter is not None:
        adapter.save_pretrained(str(directory / "lora"))


def table(results: dict) -> str:
    """Perplexity per row and context retained (SE) per student and held-out text, in markdown."""
    lines = ["| student | trained parameters | text | clean prefix | nothing sent | prompt alone | **private path** "
             "| mismatched control | context retained (SE) | clean prefix, adapter on | train KL, last 10 steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, cell in results["cells"].items():
        for data, score in cell["scores"].items():
            ppl = score["perplexity"]
            adapted = f"{ppl[ADAPTED_CLEAN]:.1f}" if ADAPTED_CLEAN in ppl else "-"
            lines.append(f"| {name} | {cell['trainable_parameters']:,} | {data} | {ppl['clean prefix']:.1f} | "
                         f"{ppl['nothing sent']:.1f} | {ppl['soft prompt alone']:.1f} | **{ppl['private path']:.1f}** "
                         f"| {ppl['mismatched control']:.1f} | {score['context_retained']:+.2f} "
                         f"({score['context_retained_se']:.2f}) | {adapted} | {np.mean(cell['loss_curve'][-10:]):.3f} |")
    return "\n".join(lines)


def main() -> None:
    from app.reconstruction import load_projection
    from app.settings import ServerSettings
    from app.training.data import read_corpus
    from app.training.jobs import training_chat

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mu", type=float, default=10.0)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2, help="the soft prompt's Adam learning rate")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4, help="LoRA on the first LAYERS decoder blocks")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="the adapter's Adam learning rate")
    parser.add_argument("--data", default="general")
    parser.add_argument("--chat-examples", type=int, default=48)
    parser.add_argument("--segments", type=int, default=32, help="evenly spaced check segments per held-out text")
    parser.add_argument("--seed", type=int, default=0, help="training batches and noise, and the check's noise")
    parser.add_argument("--save-dir", type=Path, default=None, help="keep the trained prompts and adapter here")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()

    settings = ServerSettings()
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    published = load_projection(settings.projection_dir / PROJECTION)
    projection = published.projection
    config = SoftPromptConfig(name="distill-lora", projection_id=published.id,
                              bits=args.bits, mu=args.mu, data=args.data, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, objective="distill", chat_examples=args.chat_examples, seed=args.seed)
    text = read_corpus(args.data, settings.data_dir)
    held_out = {data: read_corpus(data, settings.data_dir) for data in HELD_OUT}
    print(f"{settings.model}, projection {PROJECTION}, n={args.bits}, mu={args.mu:g}: {args.steps} distillation steps "
          f"of {args.batch_size} per student; LoRA rank {args.rank} on the first {args.layers} blocks "
          f"(lr {args.lora_lr:g}), soft prompt lr {args.lr:g}; {args.segments} check segments per text\n")
    run(runner, projection, config, lora_config(args.rank, args.layers), args.lora_lr, text,
        training_chat(runner, settings, config, text), held_out, RESULTS, segments=args.segments, seed=args.seed,
        fresh=args.fresh, save_dir=args.save_dir, plan={"model": settings.model, "projection": PROJECTION})


if __name__ == "__main__":
    main()
