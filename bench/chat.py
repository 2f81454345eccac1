"""Chat prompts on the default model: what a public template, selective privacy and the soft prompt do to an answer.

    python -m bench.chat [--seeds 5] [--prompt "What is the capital of France?"]

Starts `veil serve` on the default model and settings (mu = 4, n = 4, the shipped projection and soft prompts) and
sends the prompt, each time with fresh noise (seeds 0..S-1), in five ways:
- clean: the message public (no privacy), for reference;
- whole message private: the SDK's default (the chat template public, no soft prompt);
- template private too + soft prompt: every token private, as before wire version 2; the server then prepends the
  WikiText soft prompt trained for the nearest mu;
- selective noise: only the country noised (`[[France]]`);
- placeholder: the country replaced by `[COUNTRY_1]` on the device and restored in the answer.
For each it counts answers with WikiText artefacts (`<unk>`, `@unk`, `@-@`) and answers naming Paris, and shows the
first answer. Prints a table and writes bench/results/chat.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import httpx
import numpy as np

from app.cli import local_server
from client_sdk import PrivateLLMClient, markup
from client_sdk.privatize import privatize_tokens

RESULTS = Path(__file__).parent / "results" / "chat.json"
ARTEFACTS = re.compile(r"<unk>|@unk|@-@|@,@|@\.@")


def country_marked(prompt: str, markup_form: str) -> str:
    return prompt.replace("France", markup_form)


def run(prompt: str, seeds: int, max_new_tokens: int, port: int) -> list[dict]:
    modes = {
        "clean (message public)": [{"role": "user", "content": prompt, "public": True}],
        "whole message private (default)": prompt,
        "template private too + soft prompt": None,
        "selective noise ([[France]])": [{"role": "user", "content": markup(country_marked(prompt, "[[France]]"))}],
        "placeholder ([[France|COUNTRY]])": [{"role": "user",
                                              "content": markup(country_marked(prompt, "[[France|COUNTRY]]"))}],
    }
    rows = []
    with local_server(port) as url:
        for mode, message in modes.items():
            answers, soft = [], None
            for seed in range(seeds):
                with PrivateLLMClient(url, ledger=False, seed=seed) as client:
                    if message is not None:
                        result = client.generate(message, max_new_tokens=max_new_tokens, stop=["\n\n"])
                        answers.append(result.text)
                        soft = result.soft_prompt
                        continue
                    bundle = client.bundle  # every token private, the template too: one private span
                    projection = bundle.projection()
                    body = privatize_tokens(bundle.tokenize(prompt), bundle.tables[projection.id],
                                            bundle.mechanism(client.policy), projection.id,
                                            np.random.default_rng(seed))
                    answer = httpx.post(f"{url}/v1/generate", params={"max_new_tokens": max_new_tokens}, content=body,
                                        headers={"Content-Type": "application/octet-stream"}, timeout=300).json()
                    answers.append(answer["text"])
                    soft = answer["soft_prompt"]
            rows.append({"mode": mode, "soft_prompt": soft, "answers": answers,
                         "with_artefacts": sum(bool(ARTEFACTS.search(a)) for a in answers),
                         "naming_paris": sum("Paris" in a for a in answers), "n": len(answers)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    rows = run(args.prompt, args.seeds, args.max_new_tokens, args.port)
    print(f"{'mode':36s} {'soft prompt':22s} {'artefacts':>9s} {'Paris':>6s}  first answer")
    for r in rows:
        print(f"{r['mode']:36s} {str(r['soft_prompt']):22s} {r['with_artefacts']:>5d}/{r['n']:<3d} "
              f"{r['naming_paris']:>3d}/{r['n']:<3d} {r['answers'][0][:70]!r}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": f"veil bench chat --seeds {args.seeds}", "prompt": args.prompt,
                                   "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
