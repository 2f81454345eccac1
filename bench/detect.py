"""The on-device detector (client_sdk.detect): train its name classifier, and measure it.

    python -m bench.detect train [--epochs 4]    # writes client_sdk/data/detector.{safetensors,json}
    python -m bench.detect [--synthesized 2000]  # = veil bench detect; writes bench/results/detect.{json,md}
    python -m bench.detect treatments            # placeholder against noise on the real model (needs .[bench])

Training (numpy, one core, a few minutes; needs Faker, `pip install .[detect]`): texts synthesized from the training
templates with Faker values in 33 locales, the four training Austen novels labelled with the people and places
of bench/data/austen-entities.json (Emma is held out), and WikiText-2 valid (no names listed: capitalised words
that are not common words are left unlabelled, the rest is not a name); a tenth of each is kept aside to choose the name bias (the
O-logit offset with the best F2, recall weighted). The model: hashed features summed into 32 dimensions, one
hidden layer of 64, four outputs (O, PERSON, LOCATION, ORGANIZATION), trained with Adam (lazy on the embedding).

The benchmark: recall and precision per label on (a) text from the held-out templates with fresh Faker values,
(b) Emma in chunks of ~150 words against its hand-built list, (c) WikiText-2 test's running text labelled as far as
lists allow (countries, first name + capitalised words); the share of other words flagged; ms per 100 words on one
core. A gold mention counts as found when detections of its label cover all its characters' words ("found, any
label": any detection covers them); a detection counts as right when it overlaps a gold mention of its label, and is
not counted where it only touches words nobody labelled (unknown); "any label" counts a mention found (or a
detection right) whatever the label, which is what privacy needs: every label gets the same treatment by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from safetensors.numpy import save  # noqa: E402

from bench.detect_data import (HELD_OUT_NOVEL, TRAINING_NOVELS, Labelled, casing, common_words, gazetteers,  # noqa: E402
                               novel, synthesized, wikitext_test, wikitext_valid)
from client_sdk import detect as detector  # noqa: E402
from client_sdk.detect import LABELS, NAME_LABELS, NameModel, tokenize  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLASSES = ["O", *NAME_LABELS]
TRAIN_COMMAND = "python -m bench.detect train"
BENCH_COMMAND = "python -m bench.detect"


# -- training -------------------------------------------------------------------------------------------------

def token_targets(item: Labelled) -> tuple[list[str], list[bool], np.ndarray]:
    """Tokens, sentence starts and a class per token (-1: not trained on: unknown, or a structured identifier,
    which the patterns find)."""
    words, offsets, starts = tokenize(item.text)
    target = np.zeros(len(words), dtype=np.int64)
    for t, (s, e) in enumerate(offsets):
        if detector._not_a_name(words, t):
            target[t] = -1  # never a name (client_sdk.detect ignores its label)
            continue
        for gs, ge, label in item.spans:
            if s < ge and gs < e:
                target[t] = CLASSES.index(label) if label in NAME_LABELS else -1
        if any(s < ue and us < e for us, ue in item.unknown):
            target[t] = -1
    return words, starts, target


class Batch:
    def __init__(self, model: NameModel, items: list[Labelled]) -> None:
        ids, offsets, targets, lexical, n = [], [], [], [], 0
        for item in items:
            words, starts, target = token_targets(item)
            if not words:
                continue
            lexical.append([model.lexical_count(w) for w in words])
            item_ids, item_offsets = model.token_ids(words, starts)
            ids.append(item_ids)
            offsets.append(item_offsets + n)
            targets.append(target)
            n += len(item_ids)
        self.ids = np.concatenate(ids).astype(np.int32)
        self.offsets = np.concatenate(offsets)
        self.targets = np.concatenate(targets)
        self.lexical = np.concatenate(lexical)


class Adam:
    def __init__(self, params: dict[str, np.ndarray], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict[str, tuple[np.ndarray | None, np.ndarray]]) -> None:
        """grads: name -> (rows or None for all, gradient)."""
        self.t += 1
        b1, b2 = 0.9, 0.999
        scale = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for k, (rows, g) in grads.items():
            p, m, v = self.params[k], self.m[k], self.v[k]
            if rows is None:
                m[:] = b1 * m + (1 - b1) * g
                v[:] = b2 * v + (1 - b2) * g * g
                p -= scale * m / (np.sqrt(v) + 1e-8)
            else:  # lazy: only the rows this batch used
                m[rows] = b1 * m[rows] + (1 - b1) * g
                v[rows] = b2 * v[rows] + (1 - b2) * g * g
                p[rows] -= scale * m[rows] / (np.sqrt(v[rows]) + 1e-8)


def train_step(model: NameModel, batch: Batch, opt: Adam, weights: np.ndarray, rng: np.random.Generator,
               word_dropout: float) -> float:
    ids, offsets, y = batch.ids.copy(), batch.offsets, batch.targets
    # a token's first features are its letters': hide them at random so that the model learns names it has not seen
    # from their kind (shape, case, gazetteers) and context instead of memorizing the training names
    dropped = rng.random(len(offsets)) < word_dropout
    starts, counts = offsets[dropped], batch.lexical[dropped]
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    ids[np.repeat(starts, counts) + within] = model.feature_id("hidden")
    emb = model.embedding
    summed = np.add.reduceat(emb[ids], offsets, axis=0)
    pre = summed @ model.hidden_w + model.hidden_b
    hidden = np.maximum(pre, 0)
    logits = hidden @ model.out_w + model.out_b
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    keep = y >= 0
    w = np.where(keep, weights[np.maximum(y, 0)], 0.0)
    w /= max(w.sum(), 1e-9)
    loss = -(w * np.log(prob[np.arange(len(y)), np.maximum(y, 0)] + 1e-12)).sum()
    d_logits = prob
    d_logits[np.arange(len(y)), np.maximum(y, 0)] -= 1
    d_logits *= w[:, None]
    d_hidden = d_logits @ model.out_w.T
    d_pre = d_hidden * (pre > 0)
    d_summed = d_pre @ model.hidden_w.T
    lengths = np.diff(np.append(offsets, len(ids)))
    rows, inverse = np.unique(ids, return_inverse=True)
    d_emb = np.zeros((len(rows), emb.shape[1]), dtype=np.float32)
    np.add.at(d_emb, inverse, np.repeat(d_summed, lengths, axis=0))
    opt.step({"embedding": (rows, d_emb), "hidden.weight": (None, summed.T @ d_pre),
              "hidden.bias": (None, d_pre.sum(0)), "out.weight": (None, hidden.T @ d_logits),
              "out.bias": (None, d_logits.sum(0))})
    return float(loss)


def new_model(config: dict, seed: int) -> NameModel:
    rng = np.random.default_rng(seed)
    dim, hidden = config["dim"], config["hidden"]
    tensors = {"embedding": (rng.normal(size=(config["buckets"], dim)) * 0.05).astype(np.float32),
               "hidden.weight": (rng.normal(size=(dim, hidden)) / np.sqrt(dim)).astype(np.float32),
               "hidden.bias": np.zeros(hidden, dtype=np.float32),
               "out.weight": (rng.normal(size=(hidden, len(CLASSES))) / np.sqrt(hidden)).astype(np.float32),
               "out.bias": np.zeros(len(CLASSES), dtype=np.float32)}
    return NameModel(tensors, config)


def training_texts(synthetic: int, seed: int, common: frozenset[str]) -> tuple[list[Labelled], list[Labelled]]:
    """(train, dev): synthesized texts, the training novels' chunks and WikiText-2 valid's lines (no names listed:
    what is not a name), a tenth of each kept for dev."""
    texts = synthesized(synthetic, seed=seed, held_out=False)
    prose = [chunk for name in TRAINING_NOVELS for chunk in novel(name, common)]
    rng = np.random.default_rng(seed)
    train, dev = [], []
    for group in (texts, prose, wikitext_valid(common)):
        order = rng.permutation(len(group))
        cut = len(group) // 10
        dev += [group[i] for i in order[:cut]]
        train += [group[i] for i in order[cut:]]
    return train, dev


def choose_bias(model: NameModel, dev: list[Labelled]) -> float:
    """The name bias with the best F2 of name mentions on the dev texts."""
    best = (-1.0, 0.0)
    for bias in np.arange(-1.0, 3.01, 0.25):
        model.bias[1:] = bias
        scores = score([(item, _name_spans(item.text, model)) for item in dev], NAME_LABELS)
        r, p = scores["names"]["recall"], scores["names"]["precision"]
        f2 = 5 * p * r / max(4 * p + r, 1e-9)
        print(f"  bias {bias:+.2f}: recall {r:.3f} precision {p:.3f} F2 {f2:.3f}")
        best = max(best, (f2, float(bias)))
    return best[1]


def _name_spans(text: str, model: NameModel) -> list[detector.Detection]:
    return detector._name_detections(text, model)


def train(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    word_casing = casing()
    common = common_words(word_casing)
    config = {"labels": CLASSES, "buckets": 2 ** args.bucket_bits, "dim": 32, "hidden": 64,
              "gazetteers": gazetteers(), "casing": word_casing}
    model = new_model(config, args.seed)
    train_items, dev = training_texts(args.synthesized, args.seed, common)
    rng = np.random.default_rng(args.seed)
    print(f"{len(train_items)} training texts, {len(dev)} dev texts; featurizing", file=sys.stderr)
    order = rng.permutation(len(train_items))
    batches = [Batch(model, [train_items[i] for i in order[b : b + args.batch_texts]])
               for b in tqdm(range(0, len(order), args.batch_texts), desc="featurize")]
    params = {"embedding": model.embedding, "hidden.weight": model.hidden_w, "hidden.bias": model.hidden_b,
              "out.weight": model.out_w, "out.bias": model.out_b}
    opt = Adam(params, args.lr)
    weights = np.array([1.0, *[args.name_weight] * len(NAME_LABELS)])
    for epoch in range(args.epochs):
        losses = [train_step(model, batches[i], opt, weights, rng, args.word_dropout)
                  for i in tqdm(rng.permutation(len(batches)), desc=f"epoch {epoch + 1}/{args.epochs}")]
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}", file=sys.stderr)
    model.bias[:] = 0
    bias = choose_bias(model, dev)
    config.update(name_bias=bias, trained_by=TRAIN_COMMAND + " " + " ".join(sys.argv[2:]),
                  training={"synthesized_texts": args.synthesized, "novels": list(TRAINING_NOVELS),
                            "held_out": HELD_OUT_NOVEL, "epochs": args.epochs, "seed": args.seed})
    from app.files import write_bytes_atomic

    write_bytes_atomic(detector.WEIGHTS.with_suffix(".safetensors"), save(
        {"embedding": model.embedding.astype(np.float16), "hidden.weight": model.hidden_w,
         "hidden.bias": model.hidden_b, "out.weight": model.out_w, "out.bias": model.out_b}))
    write_bytes_atomic(detector.WEIGHTS.with_suffix(".json"), json.dumps(config, separators=(",", ":")).encode() + b"\n")
    print(f"name bias {bias:+.2f}; wrote {detector.WEIGHTS}.{{safetensors,json}}", file=sys.stderr)


# -- evaluation -----------------------------------------------------------------------------------------------

def _word_positions(text: str) -> list[tuple[int, int]]:
    return [span for word, span in zip(*tokenize(text)[:2]) if word[0].isalnum()]


def score(results: list[tuple[Labelled, list[detector.Detection]]], labels: tuple[str, ...]) -> dict:
    """Recall and precision per label and together ("names" for the name labels, "identifiers" for the rest)."""
    def covered(s: int, e: int, dets, words) -> bool:
        inside = [(a, b) for a, b in words if a < e and s < b]
        return bool(inside) and all(any(d.start <= a and b <= d.end for d in dets) for a, b in inside)

    keys = ("gold", "found", "found_any", "detected", "right", "right_any")
    counts = {label: dict.fromkeys(keys, 0) for label in labels}
    other_words = other_flagged = 0
    for item, dets in results:
        words = _word_positions(item.text)
        for s, e, label in item.spans:
            if label not in counts:
                continue
            counts[label]["gold"] += 1
            counts[label]["found"] += covered(s, e, [d for d in dets if d.label == label], words)
            counts[label]["found_any"] += covered(s, e, dets, words)
        for d in dets:
            if d.label not in counts:
                continue
            right = any(d.start < e and s < d.end and label == d.label for s, e, label in item.spans)
            right_any = any(d.start < e and s < d.end for s, e, _ in item.spans)
            unknown = any(d.start < e and s < d.end for s, e in item.unknown)
            if right_any or not unknown:
                counts[d.label]["detected"] += 1
                counts[d.label]["right"] += right
                counts[d.label]["right_any"] += right_any
        for a, b in words:
            if any(a < e and s < b for s, e, _ in item.spans) or any(a < e and s < b for s, e in item.unknown):
                continue
            other_words += 1
            other_flagged += any(d.start < b and a < d.end for d in dets)
    out = {}
    groups = {label: [label] for label in labels}
    groups["names"] = [label for label in labels if label in NAME_LABELS]
    groups["identifiers"] = [label for label in labels if label not in NAME_LABELS]
    for name, members in groups.items():
        c = {k: sum(counts[m][k] for m in members) for k in keys}
        if not c["gold"] and not c["detected"]:
            continue
        out[name] = {"gold": c["gold"], "recall": c["found"] / c["gold"] if c["gold"] else None,
                     "recall_any_label": c["found_any"] / c["gold"] if c["gold"] else None,
                     "detected": c["detected"], "precision": c["right"] / c["detected"] if c["detected"] else None,
                     "precision_any_label": c["right_any"] / c["detected"] if c["detected"] else None}
    out["other_words_flagged"] = other_flagged / max(other_words, 1)
    out["other_words"] = other_words
    return out


def misses(results: list[tuple[Labelled, list[detector.Detection]]], limit: int = 15) -> dict:
    """The most common gold mentions not found and detections not right (for the report)."""
    from collections import Counter

    missed, wrong = Counter(), Counter()
    for item, dets in results:
        for s, e, label in item.spans:
            if not any(d.start <= s and e <= d.end and d.label == label for d in dets):
                missed[f"{item.text[s:e]} ({label})"] += 1
        for d in dets:
            if not any(d.start < e and s < d.end and label == d.label for s, e, label in item.spans) and \
                    not any(d.start < e and s < d.end for s, e in item.unknown):
                wrong[f"{item.text[d.start:d.end]} ({d.label})"] += 1
    return {"missed": missed.most_common(limit), "wrongly_flagged": wrong.most_common(limit)}


def speed(texts: list[str], repeats: int = 3) -> float:
    """Milliseconds per 100 words of detect(), best of `repeats` passes, one thread (after a warm-up pass)."""
    words = sum(len(_word_positions(t)) for t in texts)
    for t in texts:
        detector.detect(t)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for t in texts:
            detector.detect(t)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / words * 100


def evaluate(args: argparse.Namespace) -> dict:
    model = detector.name_model()
    if model is None:
        raise SystemExit(f"no detector weights at {detector.WEIGHTS}; run `{TRAIN_COMMAND}` first")
    common = common_words(model.casing)
    sets = {
        "synthesized (held-out templates)": synthesized(args.synthesized, seed=args.seed + 1, held_out=True),
        "Emma (held out)": novel("emma", common),
        "WikiText-2 test (list-labelled)": wikitext_test(gazetteers(seed=args.seed + 2), common),
    }
    report = {"command": BENCH_COMMAND + " " + " ".join(sys.argv[1:]), "trained_by": model.config.get("trained_by"),
              "name_bias": model.config.get("name_bias"), "sets": {}}
    for name, items in sets.items():
        results = [(item, detector.detect(item.text)) for item in items]
        report["sets"][name] = {"texts": len(items), "words": sum(len(_word_positions(i.text)) for i in items),
                                "scores": score(results, LABELS), "examples": misses(results)}
    report["ms_per_100_words"] = speed([item.text for item in sets["Emma (held out)"][:200]])
    report["ms_per_100_words_synthesized"] = speed([item.text for item in sets["synthesized (held-out templates)"][:500]])
    report["weights_bytes"] = detector.WEIGHTS.with_suffix(".safetensors").stat().st_size + \
        detector.WEIGHTS.with_suffix(".json").stat().st_size
    return report


CHAT_PROMPTS = Path(__file__).parent / "data" / "chat_prompts.jsonl"


def treatments(args: argparse.Namespace) -> dict:
    """Placeholder against noise for detected spans, on the real model: the chat prompts in which the detector finds
    something, answered clean (the prompt public) and with every detected span a placeholder or noised (the rest
    public; noise with fresh randomness per seed); COH (cosine of MiniLM sentence embeddings) against the clean
    answer, with its bootstrap SE, and the share of answers without <unk> or loops."""
    import dataclasses

    from app.cli import local_server
    from bench.bootstrap import bootstrap_se
    from bench.privacy_utility import degenerate, minilm_encoder
    from client_sdk import PrivacyPolicy, PrivateLLMClient

    prompts = [json.loads(line)["prompt"] for line in CHAT_PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [p for p in prompts if detector.detect(p)][: args.prompts]
    encoder = minilm_encoder()
    rows = {}
    with local_server(args.port) as url:
        with PrivateLLMClient(url, ledger=False) as client:
            clean = [client.generate([{"role": "user", "content": p, "public": True}], max_new_tokens=args.tokens,
                                     stop=["\n\n"]).text for p in prompts]
        for treatment in ("placeholder", "noise"):
            policy = dataclasses.replace(PrivacyPolicy.default(), private="detect",
                                         treatments=dict.fromkeys(LABELS, treatment))
            answers, references = [], []
            for seed in range(1 if treatment == "placeholder" else args.seeds):
                with PrivateLLMClient(url, ledger=False, policy=policy, seed=seed) as client:
                    answers += [client.generate(p, max_new_tokens=args.tokens, stop=["\n\n"]).text for p in prompts]
                references += clean
            values = (encoder(answers) * encoder(references)).sum(axis=1)
            rows[treatment] = {"coh": float(values.mean()), "coh_se": bootstrap_se(lambda m: m, values),
                               "loop_free": float(np.mean([not degenerate(a) for a in answers])),
                               "answers": len(answers), "first_answer": answers[0]}
    return {"command": BENCH_COMMAND + " " + " ".join(sys.argv[1:]), "prompts": prompts, "clean_first_answer": clean[0],
            "max_new_tokens": args.tokens, "rows": rows}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(report: dict) -> str:
    lines = ["# The on-device detector", "", f"`{report['command'].strip()}` (weights by `{report['trained_by']}`, "
             f"name bias {report['name_bias']:+.2f}); one core, numpy only.", ""]
    for name, result in report["sets"].items():
        scores = result["scores"]
        lines += [f"## {name}: {result['texts']} texts, {result['words']} words", "",
                  "| label | gold | recall | recall (any label) | detected | precision | precision (any label) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for label, s in scores.items():
            if isinstance(s, dict):
                lines.append(f"| {label} | {s['gold']} | {_fmt(s['recall'])} | {_fmt(s['recall_any_label'])} | "
                             f"{s['detected']} | {_fmt(s['precision'])} | {_fmt(s['precision_any_label'])} |")
        lines += ["", f"Other words flagged: {scores['other_words_flagged']:.2%} of {scores['other_words']}.", "",
                  "Most often missed: " + ", ".join(f"{k} x{v}" for k, v in result["examples"]["missed"]) + ".", "",
                  "Most often flagged wrongly: " + ", ".join(f"{k} x{v}" for k, v in result["examples"]["wrongly_flagged"]) + ".", ""]
    lines += [f"Speed: {report['ms_per_100_words']:.2f} ms per 100 words on Emma, "
              f"{report['ms_per_100_words_synthesized']:.2f} on the synthesized texts (one thread, best of 3).",
              f"Weights: {report['weights_bytes'] / 1e6:.1f} MB.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", nargs="?", choices=["evaluate", "train", "treatments"], default="evaluate")
    parser.add_argument("--prompts", type=int, default=12, help="treatments: chat prompts with detections")
    parser.add_argument("--seeds", type=int, default=2, help="treatments: noise draws per prompt")
    parser.add_argument("--tokens", type=int, default=48, help="treatments: answer length")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--synthesized", type=int, default=None,
                        help="synthesized texts (train: 30000; evaluate: 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-texts", type=int, default=64)
    parser.add_argument("--bucket-bits", type=int, default=17)
    parser.add_argument("--name-weight", type=float, default=2.0, help="loss weight of the name classes against O")
    parser.add_argument("--word-dropout", type=float, default=0.5,
                        help="share of tokens trained without their letters' features")
    args = parser.parse_args()
    if args.action == "train":
        args.synthesized = args.synthesized or 30000
        train(args)
        return
    if args.action == "treatments":
        report = treatments(args)
        from app.files import write_bytes_atomic

        write_bytes_atomic(RESULTS / "detect-treatments.json", json.dumps(report, indent=1).encode() + b"\n")
        for name, row in report["rows"].items():
            print(f"{name:12s} COH {row['coh']:.3f} ± {row['coh_se']:.3f}  loop-free {row['loop_free']:.0%}  "
                  f"({row['answers']} answers) first: {row['first_answer']!r}")
        return
    args.synthesized = args.synthesized or 2000
    report = evaluate(args)
    from app.files import write_bytes_atomic

    write_bytes_atomic(RESULTS / "detect.json", json.dumps(report, indent=1).encode() + b"\n")
    write_bytes_atomic(RESULTS / "detect.md", markdown(report).encode())
    print(markdown(report))


if __name__ == "__main__":
    main()
