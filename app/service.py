"""The privacy path on the server: payload -> levels -> embeddings -> soft prompt -> generation."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import torch

from app.engine.load import backend_name, load_backend
from app.engine.request import Completion, EngineRequest, GenerationParams, SoftPromptPrefix
from app.model_runner import ModelRunner
from app.reconstruction import PublishedProjection, load_projections, pca_projection, publish, reconstruct_payload
from app.settings import ServerSettings
from app.soft_prompts import SoftPrompt, load_soft_prompts, select_soft_prompt
from client_sdk import wire
from client_sdk.bundle import sha256_hex
from client_sdk.mechanism import MechanismParams
from client_sdk.schemas import BundleInfo, GenerateResponse, MechanismDefaults, ProjectionInfo


@dataclass
class PreparedInput:
    """A reconstructed prompt ready for the model, and how it was made."""

    embeddings: torch.Tensor  # T x b (the soft prompt goes before them in the backend)
    prompt_tokens: int
    private_tokens: int
    params: MechanismParams
    soft_prompt: SoftPrompt | None
    soft_prompt_exact: bool
    timings: dict[str, float]


def published_projections(runner: ModelRunner, settings: ServerSettings, *,
                          active_only: bool = True) -> tuple[dict[str, PublishedProjection], dict[str, str]]:
    """The trained projections for this model (the active ones, or all), then the PCA fallback, by id; and, by
    name, why each other trained projection is not among them."""
    table = runner.input_embeddings.detach()
    trained, skipped = load_projections(settings.projection_dir, runner, active_only=active_only)
    pca = publish(pca_projection(table, min(settings.projection_dim, table.shape[1]), settings.clip), table)
    return {p.id: p for p in [*trained, pca]}, skipped


@dataclass(frozen=True)
class Catalog:
    """What the server serves: projections, soft prompts and the bundle describing them (swapped as a whole)."""

    projections: dict[str, PublishedProjection]
    soft_prompts: list[SoftPrompt]
    bundle: BundleInfo
    not_served: dict[str, str]
    """Why each artifact that is not served is not, by its folder (`projections/NAME`, `soft_prompts/NAME`)."""

    @property
    def dims(self) -> dict[str, int]:
        return {pid: p.projection.dim for pid, p in self.projections.items()}


class InferenceService:
    """Holds the model, the served projections and soft prompts; serves the bundle and generations."""

    def __init__(self, runner: ModelRunner, settings: ServerSettings):
        self.runner, self.settings = runner, settings
        self.backend_name = backend_name(runner, settings)
        self.backend = load_backend(runner, settings, self.backend_name)
        tokenizer = runner.tokenizer
        self.tokenizer_bytes = tokenizer.backend_tokenizer.to_str().encode()
        self.catalog = self._load_catalog()

    def reload(self) -> None:
        """Re-read the active artifacts (after training, activation or deletion)."""
        self.catalog = self._load_catalog()

    def _load_catalog(self) -> Catalog:
        runner, settings, tokenizer = self.runner, self.settings, self.runner.tokenizer
        table = runner.input_embeddings
        projections, skipped_projections = published_projections(runner, settings)
        loaded, skipped_prompts = load_soft_prompts(settings.soft_prompt_dir, runner,
                                                    serve_below_floor=settings.serve_below_floor)
        soft_prompts = [s for s in loaded if s.projection_id in projections]
        skipped_prompts |= {s.name: f"its projection {s.projection_id} is not served" for s in loaded
                            if s.projection_id not in projections}
        not_served = {**{f"projections/{name}": why for name, why in skipped_projections.items()},
                      **{f"soft_prompts/{name}": why for name, why in skipped_prompts.items()}}
        bundle = BundleInfo(
            model_id=runner.model_id,
            vocab_size=table.shape[0],
            hidden_size=table.shape[1],
            wire_version=wire.VERSION,
            max_prompt_tokens=settings.max_prompt_tokens,
            tokenizer_url="/v1/bundle/tokenizer.json",
            tokenizer_sha256=sha256_hex(self.tokenizer_bytes),
            chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            projections=[
                ProjectionInfo(id=pid, dim=p.projection.dim, clip=p.projection.clip,
                               table_url=f"/v1/bundle/projections/{pid}", table_sha256=sha256_hex(p.table_bytes))
                for pid, p in projections.items()
            ],
            soft_prompts=[s.info() for s in soft_prompts],
            defaults=MechanismDefaults(projection_id=next(iter(projections)), bits=settings.default_bits,
                                       mu=settings.default_mu),
        )
        return Catalog(projections, soft_prompts, bundle, not_served)

    @property
    def bundle(self) -> BundleInfo:
        return self.catalog.bundle

    @property
    def max_payload_bytes(self) -> int:
        return wire.max_payload_size(self.settings.max_prompt_tokens, max(self.catalog.dims.values()))

    def prepare(self, body: bytes, tenant: str | None = None) -> PreparedInput:
        """Decode and validate the payload, embed its spans in order (private ones through the projection,
        public ones with the model's own table) and select the matching soft prompt (a tenant's DP prompts only for
        that `tenant`); the backend puts the soft prompt before the embeddings.

        A soft prompt is used only for a prompt that is private throughout: that is the input the soft
        prompts were trained on (noised WikiText continuations). A prompt with public spans (a chat template
        in the clear, selective privacy) reaches the model as it is; a WikiText soft prompt pulls chat answers
        towards WikiText's `<unk>`-laden prose (measured: docs/BENCHMARKS.md, "Chat prompts and soft prompts").
        """
        catalog, table = self.catalog, self.runner.input_embeddings.detach()
        start = time.perf_counter()
        payload = wire.decode(body, projections=catalog.dims, max_tokens=self.settings.max_prompt_tokens,
                              vocab_size=table.shape[0])
        decoded = time.perf_counter()
        embeddings = reconstruct_payload(payload, catalog.projections[payload.projection_id].projection, table)
        soft, exact = None, False
        if payload.public_tokens == 0:
            soft, exact = select_soft_prompt(catalog.soft_prompts, payload.projection_id, payload.params.bits,
                                             payload.params.mu_clt, tenant=tenant)
        done = time.perf_counter()
        return PreparedInput(embeddings, payload.tokens, payload.private_tokens, payload.params, soft, exact,
                             {"decode": decoded - start, "reconstruct": done - decoded})

    def submit(self, prepared: PreparedInput, params: GenerationParams, cancelled: threading.Event | None = None,
               on_text: Callable[[str], None] | None = None) -> Future[Completion]:
        """Hand the prepared prompt and its soft prompt to the backend (raises Overloaded when it is full); the
        generation stops at the next token once `cancelled` is set, and fails past the server's deadline."""
        soft = prepared.soft_prompt
        return self.backend.submit(EngineRequest(
            prefix=SoftPromptPrefix(soft.name, soft.embeddings) if soft else None, embeds=prepared.embeddings,
            params=params, cancelled=cancelled or threading.Event(), on_text=on_text,
            deadline=time.monotonic() + self.settings.generation_deadline_s))

    def generate(self, prepared: PreparedInput, params: GenerationParams) -> GenerateResponse:
        """Generate and wait for the answer (blocking; `generate_async` is the twin for the event loop)."""
        start = time.perf_counter()
        completion = self.submit(prepared, params).result()
        return self._response(prepared, completion, start)

    async def generate_async(self, prepared: PreparedInput, params: GenerationParams,
                             cancelled: threading.Event) -> GenerateResponse:
        start = time.perf_counter()
        completion = await asyncio.wrap_future(self.submit(prepared, params, cancelled))
        return self._response(prepared, completion, start)

    def stream(self, prepared: PreparedInput, params: GenerationParams,
               cancelled: threading.Event) -> AsyncIterator[str | GenerateResponse]:
        """Queue the generation now (raises Overloaded when full) and return an iterator over its text pieces, as
        they come, and then the final response (with the whole text). Call it on the event loop.

        Closing the iterator early (the client went away) sets `cancelled`: generation stops at the next token."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def deliver(piece: str | None) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        answer = self.submit(prepared, params, cancelled, on_text=deliver)
        answer.add_done_callback(lambda _: deliver(None))

        async def until_done() -> AsyncIterator[str | GenerateResponse]:
            try:
                while (piece := await pieces.get()) is not None:
                    yield piece
                yield self._response(prepared, answer.result(), start)
            finally:
                cancelled.set()

        return until_done()

    @staticmethod
    def _response(prepared: PreparedInput, completion: Completion, start: float) -> GenerateResponse:
        soft = prepared.soft_prompt
        timings = {**prepared.timings, "generate": time.perf_counter() - start}
        return GenerateResponse(text=completion.text, prompt_tokens=prepared.prompt_tokens,
                                completion_tokens=completion.new_tokens,
                                soft_prompt=soft.name if soft else None,
                                soft_prompt_mu=soft.mu if soft else None,
                                soft_prompt_exact=prepared.soft_prompt_exact, timings=timings)
