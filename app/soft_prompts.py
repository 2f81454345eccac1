"""Soft prompts: trained virtual tokens prepended to the reconstructed prompt, one per mechanism setting.

Each lives in its own folder of `soft_prompts/` in PEFT's prompt-tuning format (adapter_config.json,
adapter_model.safetensors with key `prompt_embeddings`, loadable with `PeftModel.from_pretrained`) plus
manifest.json: the projection id, n and mu it was trained for, whether it is served, and how it was trained.
A prompt whose manifest's `floor_check` failed (worse than sending nothing on held-out text, see
app/training/floor.py) is not served, even if marked active, unless the caller asks for it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from app.artifacts import MANIFEST, manifests, not_served_reason, read_manifest, write_artifact
from app.files import write_json_atomic
from app.model_runner import ModelRunner
from client_sdk.schemas import SoftPromptInfo

WEIGHTS = "adapter_model.safetensors"
MU_MATCH = 1e-3
"""Relative tolerance of an exact mu match (the wire's float32 A moves the mu a payload implies slightly)."""


@dataclass
class SoftPrompt:
    name: str
    projection_id: str
    bits: int
    mu: float
    embeddings: torch.Tensor  # m x b
    tenant: str | None = None  # a DP prompt's tenant: served only to requests authenticated for it

    def info(self) -> SoftPromptInfo:
        return SoftPromptInfo(name=self.name, projection_id=self.projection_id, bits=self.bits, mu=self.mu,
                              virtual_tokens=int(self.embeddings.shape[0]))


def save_soft_prompt(embeddings: torch.Tensor, directory: Path, manifest: dict, runner: ModelRunner) -> None:
    """Write a soft prompt as a PEFT prompt-tuning adapter plus our manifest, atomically."""
    config = runner.model.config
    adapter_config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": runner.model_id,
        "revision": None, "inference_mode": True, "num_virtual_tokens": int(embeddings.shape[0]),
        "token_dim": int(embeddings.shape[1]), "num_transformer_submodules": 1,
        "num_attention_heads": config.num_attention_heads, "num_layers": config.num_hidden_layers,
        # RANDOM, not TEXT: PEFT would otherwise load the init tokenizer; the init text is in the manifest.
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "modules_to_save": None, "auto_mapping": None, "tokenizer_kwargs": None,
    }
    weights = save_tensors({"prompt_embeddings": embeddings.detach().float().contiguous().cpu()})
    write_artifact(directory, {WEIGHTS: weights, "adapter_config.json": json.dumps(adapter_config, indent=2).encode()},
                   manifest)


def load_soft_prompt(directory: Path) -> SoftPrompt:
    manifest = read_manifest(directory)
    embeddings = load_file(str(directory / WEIGHTS))["prompt_embeddings"]
    return SoftPrompt(name=directory.name, projection_id=manifest["projection_id"], bits=int(manifest["bits"]),
                      mu=float(manifest["mu"]), embeddings=embeddings.float(),
                      tenant=manifest.get("dp", {}).get("tenant"))


def below_floor(manifest: dict) -> bool:
    """Whether the manifest records a failed held-out check (worse than sending nothing)."""
    return manifest.get("floor_check", {}).get("passes") is False


def record_floor_check(directory: Path, check: dict) -> dict:
    """Write a held-out check (floor.py's report, or {"passes": None, "reason": why} when skipped) into a soft
    prompt's manifest; one that fails is also deactivated (the reason is kept as `inactive_reason`). Returns the
    updated manifest."""
    manifest = read_manifest(directory)
    manifest["floor_check"] = check
    if check.get("passes") is False:
        manifest["active"] = False
        manifest["inactive_reason"] = check["reason"]
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def load_soft_prompts(root: Path, runner: ModelRunner,
                      serve_below_floor: bool = False) -> tuple[list[SoftPrompt], dict[str, str]]:
    """Every active soft prompt under `root` trained for the runner's model (by name and content fingerprint) and
    width, and not worse than sending nothing (unless `serve_below_floor`); and, by name, why each other one is
    skipped."""
    loaded, skipped, hidden_size = [], {}, runner.input_embeddings.shape[1]
    for name, manifest in manifests(root).items():
        reason = not_served_reason(manifest, runner.model_id, runner.fingerprint)
        if reason is None and below_floor(manifest) and not serve_below_floor:
            reason = f"below the floor: {manifest['floor_check'].get('reason', 'worse than sending nothing')}"
        if reason is None:
            prompt = load_soft_prompt(root / name)
            if prompt.embeddings.shape[1] == hidden_size:
                loaded.append(prompt)
                continue
            reason = f"it is {prompt.embeddings.shape[1]} wide, the model {hidden_size}"
        skipped[name] = reason
    return loaded, skipped


def select_soft_prompt(prompts: list[SoftPrompt], projection_id: str, bits: int, mu: float,
                       tenant: str | None = None) -> tuple[SoftPrompt | None, bool]:
    """The prompt for this projection and n with the nearest mu (in log scale), and whether mu matched exactly;
    a tenant's DP prompts are candidates only for that `tenant`."""
    candidates = [p for p in prompts if p.projection_id == projection_id and p.bits == bits]
    candidates = [p for p in candidates if p.tenant in (None, tenant)]
    best = min(candidates, key=lambda p: abs(math.log(p.mu / mu)), default=None)
    return best, best is not None and abs(best.mu / mu - 1) <= MU_MATCH
