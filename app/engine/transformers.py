"""The transformers backend: the model in this process, the dynamic batcher (`app.engine.batching`), the soft
prompt's KV cache (`app.engine.prefix_cache`) and the decoding loop (`decode`). Training and evaluation use the
same model; on CPU the llama.cpp backend generates faster (`app.engine.llamacpp`)."""

from __future__ import annotations

from concurrent.futures import Future

import torch

from app.engine.batching import Batcher
from app.engine.prefix_cache import PrefixCache, PrefixKV
from app.engine.request import Completion, EngineRequest, FinishReason, finish_reason, send_text
from app.engine.sampling import next_tokens
from app.engine.text import TextStream
from app.model_runner import ModelRunner


class TransformersBackend:
    """Requests queue in the batcher; each batch shares a soft prompt, whose keys and values come from the cache."""

    def __init__(self, runner: ModelRunner, *, max_batch: int, window: float, max_queue: int) -> None:
        self.runner = runner
        self.prefixes = PrefixCache(runner.model)
        self.batcher = Batcher(self._run, max_batch=max_batch, window=window, max_queue=max_queue)

    def submit(self, request: EngineRequest) -> Future[Completion]:
        return self.batcher.submit(request)

    def close(self) -> None:
        self.batcher.close()

    def _run(self, batch: list[EngineRequest]) -> list[Completion]:
        """A batch shares its soft prompt (it is part of the batch key)."""
        prefix = batch[0].prefix
        return decode(self.runner, batch, self.prefixes.get(prefix) if prefix else None)


def decode(runner: ModelRunner, requests: list[EngineRequest], prefix: PrefixKV | None = None) -> list[Completion]:
    """Generate for a batch of requests whose params share a batch key, after the soft prompt's cached keys and
    values `prefix` (the requests' common soft prompt, or None). Returns one Completion each.

    Our own decoding loop rather than `generate()`, for what it cannot do: the prompts are left-padded *after*
    the cached soft prompt (its keys are the same for every row), so the attention mask has a hole and the
    position ids skip it; a row that finishes, is cancelled or runs past its deadline leaves the batch at once
    and costs no more work; stop strings are matched on the decoded tail (`TextStream`), not with
    transformers' stop-string tables (which cost time and memory in the stop strings' length).
    """
    model, params = runner.model, requests[0].params
    streams = [TextStream(runner.tokenizer, r.params.stop) for r in requests]
    finished: dict[int, FinishReason] = {}
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    device, eos = model.device, runner.eos_ids
    with runner.lock, torch.inference_mode():
        embeds, mask, positions = prefill_inputs(model, [r.embeds for r in requests], prefix)
        cache = prefix.expand(len(requests)) if prefix else None
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
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
                send_text(request, stream, finished=bool(reason))
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
            logits = model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                           position_ids=position[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return [Completion(s.final_text, tuple(s.ids), finished[i]) for i, s in enumerate(streams)]


def prefill_inputs(model: torch.nn.Module, embeds: list[torch.Tensor],
                   prefix: PrefixKV | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts left-padded to one length (B x L x b), the attention mask over the cached soft prompt and
    them (B x (m + L)), and their position ids (B x L, counting from m and skipping the padding)."""
    length, m = max(e.shape[0] for e in embeds), prefix.length if prefix else 0
    device = model.device
    batch = torch.zeros(len(embeds), length, embeds[0].shape[1], dtype=model.dtype, device=device)
    mask = torch.zeros(len(embeds), m + length, dtype=torch.long, device=device)
    mask[:, :m] = 1
    for i, e in enumerate(embeds):
        batch[i, length - e.shape[0]:] = e.to(device, model.dtype)
        mask[i, m + length - e.shape[0]:] = 1
    positions = (m + mask[:, m:].cumsum(dim=1) - 1).clamp(min=0)
    return batch, mask, positions
