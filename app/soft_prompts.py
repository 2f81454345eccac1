"""Soft prompts: trained virtual tokens prepended to the reconstructed prompt, one per mechanism setting.

Each lives in its own folder of `soft_prompts/` in PEFT's prompt-tuning format (adapter_config.json,
adapter_model.safetensors with key `prompt_embeddings`) plus manifest.json: the projection id, n and mu
it was trained for, and how it was trained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from client_sdk.schemas import SoftPromptInfo


@dataclass
class SoftPrompt:
    name: str
    projection_id: str
    bits: int
    mu: float
    embeddings: torch.Tensor  # m x b

    def info(self) -> SoftPromptInfo:
        return SoftPromptInfo(name=self.name, projection_id=self.projection_id, bits=self.bits, mu=self.mu,
                              virtual_tokens=int(self.embeddings.shape[0]))


def load_soft_prompt(directory: Path) -> SoftPrompt:
    manifest = json.loads((directory / "manifest.json").read_text())
    embeddings = load_file(str(directory / "adapter_model.safetensors"))["prompt_embeddings"]
    return SoftPrompt(name=directory.name, projection_id=manifest["projection_id"], bits=int(manifest["bits"]),
                      mu=float(manifest["mu"]), embeddings=embeddings.float())


def load_soft_prompts(root: Path, model_id: str, hidden_size: int) -> list[SoftPrompt]:
    """Every soft prompt under `root` trained for this model and width; others are skipped."""
    prompts = []
    for manifest in sorted(root.glob("*/manifest.json")):
        meta = json.loads(manifest.read_text())
        if meta.get("model_id") != model_id:
            continue
        prompt = load_soft_prompt(manifest.parent)
        if prompt.embeddings.shape[1] == hidden_size:
            prompts.append(prompt)
    return prompts


def select_soft_prompt(prompts: list[SoftPrompt], projection_id: str, bits: int, mu: float) -> SoftPrompt | None:
    """The prompt trained for this projection and n with the nearest mu (in log scale); None if there is none."""
    candidates = [p for p in prompts if p.projection_id == projection_id and p.bits == bits]
    return min(candidates, key=lambda p: abs(math.log(p.mu / mu)), default=None)
