"""The privacy path on the server: payload -> levels -> embeddings -> soft prompt -> generation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generator

import torch

from app.model_runner import GenerationParams, ModelRunner
from app.reconstruction import Projection, PublishedProjection, pca_projection, publish, reconstruct_payload
from app.settings import ServerSettings
from app.soft_prompts import SoftPrompt, load_soft_prompts, select_soft_prompt
from client_sdk import wire
from client_sdk.bundle import sha256_hex
from client_sdk.schemas import BundleInfo, GenerateResponse, MechanismDefaults, ProjectionInfo


@dataclass
class PreparedInput:
    """A reconstructed prompt ready for the model, and how it was made."""

    embeddings: torch.Tensor  # (m + T) x b
    prompt_tokens: int
    soft_prompt: SoftPrompt | None
    timings: dict[str, float]


class InferenceService:
    """Holds the model, the published projections and the soft prompts; serves the bundle and generations."""

    def __init__(self, runner: ModelRunner, settings: ServerSettings, projections: list[Projection] | None = None):
        self.runner, self.settings = runner, settings
        table = runner.input_embeddings.detach()
        if projections is None:
            projections = [pca_projection(table, min(settings.projection_dim, table.shape[1]), settings.clip)]
        published = [publish(p, table) for p in projections]
        self.projections: dict[str, PublishedProjection] = {p.id: p for p in published}
        self.soft_prompts = load_soft_prompts(settings.soft_prompt_dir, runner.model_id, table.shape[1])
        tokenizer = runner.tokenizer
        self.tokenizer_bytes = tokenizer.backend_tokenizer.to_str().encode()
        self.bundle = BundleInfo(
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
                ProjectionInfo(id=p.id, dim=p.projection.dim, clip=p.projection.clip,
                               table_url=f"/v1/bundle/projections/{p.id}", table_sha256=sha256_hex(p.table_bytes))
                for p in published
            ],
            soft_prompts=[s.info() for s in self.soft_prompts],
            defaults=MechanismDefaults(projection_id=published[0].id, bits=settings.default_bits,
                                       mu=settings.default_mu),
        )
        self._dims = {p.id: p.projection.dim for p in published}

    @property
    def max_payload_bytes(self) -> int:
        return wire.payload_size(self.settings.max_prompt_tokens, max(self._dims.values()), wire.MAX_BITS)

    def prepare(self, body: bytes) -> PreparedInput:
        """Decode and validate the payload, reconstruct embeddings and prepend the matching soft prompt."""
        start = time.perf_counter()
        payload = wire.decode(body, projections=self._dims, max_tokens=self.settings.max_prompt_tokens)
        decoded = time.perf_counter()
        embeddings = reconstruct_payload(payload, self.projections[payload.projection_id].projection)
        soft = select_soft_prompt(self.soft_prompts, payload.projection_id, payload.params.bits, payload.params.mu_clt)
        if soft is not None:
            embeddings = torch.cat([soft.embeddings, embeddings])
        done = time.perf_counter()
        return PreparedInput(embeddings, payload.tokens, soft,
                             {"decode": decoded - start, "reconstruct": done - decoded})

    def generate(self, prepared: PreparedInput, params: GenerationParams) -> GenerateResponse:
        start = time.perf_counter()
        text, new_tokens = self.runner.generate(prepared.embeddings, params)
        timings = {**prepared.timings, "generate": time.perf_counter() - start}
        return self._response(prepared, text, new_tokens, timings)

    def stream(self, prepared: PreparedInput, params: GenerationParams) -> Generator[str, None, GenerateResponse]:
        """Yield text pieces; returns the final response (with the whole text) when generation ends."""
        start = time.perf_counter()
        pieces = []
        generator = self.runner.stream(prepared.embeddings, params)
        while True:
            try:
                piece = next(generator)
            except StopIteration as end:
                new_tokens = end.value
                break
            pieces.append(piece)
            yield piece
        timings = {**prepared.timings, "generate": time.perf_counter() - start}
        return self._response(prepared, "".join(pieces), new_tokens, timings)

    @staticmethod
    def _response(prepared: PreparedInput, text: str, new_tokens: int, timings: dict[str, float]) -> GenerateResponse:
        return GenerateResponse(text=text, prompt_tokens=prepared.prompt_tokens, completion_tokens=new_tokens,
                                soft_prompt=prepared.soft_prompt.name if prepared.soft_prompt else None,
                                timings=timings)
