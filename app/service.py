"""The privacy path on the server: payload -> levels -> embeddings -> soft prompt -> generation."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Generator

import torch

from app.batching import Batcher
from app.model_runner import GenerationParams, ModelRunner
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

    embeddings: torch.Tensor  # (m + T) x b
    prompt_tokens: int
    private_tokens: int
    params: MechanismParams
    soft_prompt: SoftPrompt | None
    soft_prompt_exact: bool
    timings: dict[str, float]


def published_projections(runner: ModelRunner, settings: ServerSettings, *,
                          active_only: bool = True) -> dict[str, PublishedProjection]:
    """The trained projections for this model (the active ones, or all), then the PCA fallback, by id."""
    table = runner.input_embeddings.detach()
    trained = load_projections(settings.projection_dir, runner.model_id, table.shape[1], active_only=active_only)
    pca = pca_projection(table, min(settings.projection_dim, table.shape[1]), settings.clip)
    published = [publish(p, table) for p in [*trained, pca]]
    return {p.id: p for p in published}


@dataclass(frozen=True)
class Catalog:
    """What the server serves: projections, soft prompts and the bundle describing them (swapped as a whole)."""

    projections: dict[str, PublishedProjection]
    soft_prompts: list[SoftPrompt]
    bundle: BundleInfo

    @property
    def dims(self) -> dict[str, int]:
        return {pid: p.projection.dim for pid, p in self.projections.items()}


class InferenceService:
    """Holds the model, the served projections and soft prompts; serves the bundle and generations."""

    def __init__(self, runner: ModelRunner, settings: ServerSettings):
        self.runner, self.settings = runner, settings
        self.batcher = Batcher(runner, settings.max_batch_size, settings.batch_window_ms / 1000)
        tokenizer = runner.tokenizer
        self.tokenizer_bytes = tokenizer.backend_tokenizer.to_str().encode()
        self.catalog = self._load_catalog()

    def reload(self) -> None:
        """Re-read the active artifacts (after training, activation or deletion)."""
        self.catalog = self._load_catalog()

    def _load_catalog(self) -> Catalog:
        runner, settings, tokenizer = self.runner, self.settings, self.runner.tokenizer
        table = runner.input_embeddings
        projections = published_projections(runner, settings)
        soft_prompts = [s for s in load_soft_prompts(settings.soft_prompt_dir, runner.model_id, table.shape[1])
                        if s.projection_id in projections]
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
        return Catalog(projections, soft_prompts, bundle)

    @property
    def bundle(self) -> BundleInfo:
        return self.catalog.bundle

    @property
    def max_payload_bytes(self) -> int:
        return wire.max_payload_size(self.settings.max_prompt_tokens, max(self.catalog.dims.values()))

    def prepare(self, body: bytes) -> PreparedInput:
        """Decode and validate the payload, embed its spans in order (private ones through the projection,
        public ones with the model's own table) and prepend the matching soft prompt.

        A soft prompt is prepended only to a prompt that is private throughout: that is the input the soft
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
                                             payload.params.mu_clt)
        if soft is not None:
            embeddings = torch.cat([soft.embeddings, embeddings])
        done = time.perf_counter()
        return PreparedInput(embeddings, payload.tokens, payload.private_tokens, payload.params, soft, exact,
                             {"decode": decoded - start, "reconstruct": done - decoded})

    def generate(self, prepared: PreparedInput, params: GenerationParams) -> GenerateResponse:
        start = time.perf_counter()
        text, new_tokens = self.batcher.generate(prepared.embeddings, params)
        timings = {**prepared.timings, "generate": time.perf_counter() - start}
        return self._response(prepared, text, new_tokens, timings)

    def stream(self, prepared: PreparedInput, params: GenerationParams,
               cancelled: threading.Event | None = None) -> Generator[str, None, GenerateResponse]:
        """Yield text pieces; returns the final response (with the whole text) when generation ends.

        Setting `cancelled` (from any thread) stops generation at the next token."""
        start = time.perf_counter()
        pieces = []
        generator = self.runner.stream(prepared.embeddings, params, cancelled)
        try:
            while True:
                try:
                    piece = next(generator)
                except StopIteration as end:
                    new_tokens = end.value
                    break
                pieces.append(piece)
                yield piece
        finally:
            generator.close()  # a consumer that stops early stops the generation too
        timings = {**prepared.timings, "generate": time.perf_counter() - start}
        return self._response(prepared, "".join(pieces), new_tokens, timings)

    @staticmethod
    def _response(prepared: PreparedInput, text: str, new_tokens: int, timings: dict[str, float]) -> GenerateResponse:
        soft = prepared.soft_prompt
        return GenerateResponse(text=text, prompt_tokens=prepared.prompt_tokens, completion_tokens=new_tokens,
                                soft_prompt=soft.name if soft else None,
                                soft_prompt_mu=soft.mu if soft else None,
                                soft_prompt_exact=prepared.soft_prompt_exact, timings=timings)
