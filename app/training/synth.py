"""Chat examples synthesized on the server from plain text, with the clean model's own answers as targets.

Each example is an instruction over a short passage of the text (summarize, continue, answer a question about
it, rewrite), rendered with the model's chat template into exactly `prefix_tokens` tokens (the passage is cut
to fit), and the model's greedy answer (at most `max_new_tokens`, ending at its end-of-turn token), padded with
PAD to `continuation_tokens`. So an example has the shape of a prose segment: the prompt is what a client
sends privately, the answer what the private path should predict.

Candidates are drawn from evenly spaced passages, answers that loop are dropped, and the examples kept are
chosen farthest-first by the Jaccard distance of their answers' token sets (diversity). Generation is greedy,
so the result is deterministic; it is cached (atomically) under a key of the model, the text and the settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from app.files import write_json_atomic
from app.model_runner import ModelRunner
from app.training.data import DataError, evenly_spaced, text_sha256, token_segments
from app.training.evaluate import PAD

INSTRUCTIONS = {
    "summarize": "Summarize this passage in one sentence.",
    "continue": "Continue this passage with one more sentence.",
    "question": "Who or what is this passage about? Answer briefly.",
    "rewrite": "Rewrite this passage in plain, simple English.",
}
MARK = "\u2063PASSAGE\u2063"
VERSION = 1


def prompt_ids(runner: ModelRunner, instruction: str, passage: list[int], length: int) -> list[int]:
    """`instruction` and the start of `passage` in the chat template (with the generation prompt), `length` tokens."""
    tokenizer = runner.tokenizer
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{MARK}"}],
                                             tokenize=False, add_generation_prompt=True)
    before, after = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in rendered.split(MARK))
    room = length - len(before) - len(after)
    if room < 1:
        raise DataError(f"the chat template leaves no room for a passage in {length} prompt tokens")
    return before + passage[:room] + after


def loops(answer: list[int], n: int = 3) -> bool:
    """Whether an answer repeats itself: under half of its n-grams are distinct."""
    grams = [tuple(answer[i : i + n]) for i in range(len(answer) - n + 1)]
    return len(grams) > 4 and len(set(grams)) < 0.5 * len(grams)


def farthest_first(answers: list[list[int]], count: int) -> list[int]:
    """Indices of `count` answers chosen greedily to maximise the smallest Jaccard distance to those chosen."""
    sets = [set(a) for a in answers]
    chosen = [0]
    nearest = [1.0 - len(s & sets[0]) / max(1, len(s | sets[0])) for s in sets]
    while len(chosen) < min(count, len(sets)):
        best = max(range(len(sets)), key=lambda i: (nearest[i], -i))
        chosen.append(best)
        nearest = [min(d, 1.0 - len(s & sets[best]) / max(1, len(s | sets[best]))) for d, s in zip(nearest, sets)]
    return sorted(chosen)


def generate_answers(runner: ModelRunner, prompts: torch.Tensor, max_new_tokens: int,
                     batch_size: int = 16) -> list[list[int]]:
    """The model's greedy answer to each prompt (all the same length), up to and including its end-of-turn token."""
    eos = runner.tokenizer.eos_token_id
    answers = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size].to(runner.model.device)
            out = runner.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                        max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
            for row in out[:, batch.shape[1] :].tolist():
                answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def synthesize_chat(runner: ModelRunner, text: str, count: int, *, prefix_tokens: int, continuation_tokens: int,
                    max_new_tokens: int = 48, seed: int = 0, cache_dir: Path | None = None) -> torch.Tensor:
    """`count` chat examples (count x (prefix_tokens + continuation_tokens) ids, answers padded with PAD) from `text`.

    Twice `count` candidates are generated, looping answers dropped and the most diverse kept (fewer if too few
    remain). With `cache_dir`, the examples are read from or written to a JSON file there.
    """
    if max_new_tokens > continuation_tokens:
        raise ValueError("max_new_tokens must not exceed continuation_tokens")
    settings = {"version": VERSION, "model_id": runner.model_id, "text_sha256": text_sha256(text), "count": count,
                "prefix_tokens": prefix_tokens, "continuation_tokens": continuation_tokens,
                "max_new_tokens": max_new_tokens, "seed": seed, "instructions": INSTRUCTIONS}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / f"chat-{key}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        examples = json.loads(path.read_text())["examples"]
    else:
        examples = _synthesize(runner, text, count, prefix_tokens, max_new_tokens, seed)
        if path is not None:
            write_json_atomic(path, {"settings": settings, "examples": examples})
    rows = [e["prompt_ids"] + e["answer_ids"] + [PAD] * (continuation_tokens - len(e["answer_ids"])) for e in examples]
    return torch.tensor(rows, dtype=torch.long).view(len(rows), prefix_tokens + continuation_tokens)


def _synthesize(runner: ModelRunner, text: str, count: int, prefix_tokens: int, max_new_tokens: int,
                seed: int) -> list[dict]:
    passages = evenly_spaced(token_segments(text, runner.tokenizer, prefix_tokens), 2 * count)
    order = torch.randperm(len(INSTRUCTIONS) * len(passages), generator=torch.Generator().manual_seed(seed))
    kinds = list(INSTRUCTIONS)
    candidates = []
    for i, passage in enumerate(passages.tolist()):
        kind = kinds[int(order[i]) % len(kinds)]
        candidates.append((kind, prompt_ids(runner, INSTRUCTIONS[kind], passage, prefix_tokens)))
    answers = generate_answers(runner, torch.tensor([ids for _, ids in candidates]), max_new_tokens)
    kept = [i for i, a in enumerate(answers) if a and not loops(a)]
    chosen = [kept[j] for j in farthest_first([answers[i] for i in kept], count)] if kept else []
    decode = runner.tokenizer.decode
    return [{"instruction": candidates[i][0], "prompt_ids": candidates[i][1], "answer_ids": answers[i],
             "prompt": decode(candidates[i][1]), "answer": decode(answers[i])} for i in chosen]
