"""The llama.cpp backend (CPU): the model's GGUF run by llama.cpp through llama-cpp-python's low-level API, fed the
reconstructed embeddings.

Each running request is one llama.cpp sequence in one unified KV cache (continuous batching). Every step, the
requests admitted since the last step are prefilled from their embeddings (`llama_batch` with `embd`: private spans
as the projection decoded them, public spans as rows of the model's table, which the transformers model was
converted from, so they are the GGUF's own), and every running sequence decodes its last token (one token batch).
A request joins the batch the step after it arrives and leaves it the step it finishes, is cancelled or runs past
its deadline. A soft prompt's keys and values are computed once per artifact version, into a sequence of their own,
and copied into each request's sequence (`llama_memory_seq_cp`: in the unified cache the cells are shared, not
duplicated); so are those of the leading rows recent prompts share (a chat template's public system prompt, the
same embedding rows in every chat request). A prefix's keys are always computed in a sequence of their own: copying
a request's cells back into a shared sequence gave wrong tokens in this llama.cpp (0.3.36).

Build llama-cpp-python without native CPU detection (README: `CMAKE_ARGS="-DGGML_NATIVE=OFF ..."`, which gives
AVX2/FMA/F16C kernels and no AMX). On the development machine a native build reported AMX_INT8, which its kernel
does not list (/proc/cpuinfo), and crashed (SIGSEGV) in `llama_decode` on any batch of more than one token; the
non-native build decodes batches of up to BATCH_TOKENS there (tests/test_llamacpp.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.engine.batching import settle
from app.engine.request import (Completion, EngineRequest, FinishReason, SoftPromptPrefix, finish_reason,
                                send_text)
from app.engine.sampling import next_tokens
from app.engine.text import TextStream
from app.errors import Overloaded
from app.model_runner import ModelRunner, gguf_path
from app.settings import ServerSettings

log = logging.getLogger("veil.llamacpp")

PREFIX_SEQUENCES = 4
"""Soft prompts whose keys and values stay in the KV cache at once (least recently used dropped beyond)."""
TEMPLATE = " prompt template"
"""The resident prefix holding the leading rows recent prompts share (not an artifact name: those have no spaces)."""
MIN_TEMPLATE_ROWS = 8
BATCH_TOKENS = 512
"""llama.cpp's n_batch and n_ubatch: the most tokens one `llama_decode` call takes (longer prefills are split)."""


def available() -> bool:
    """Whether llama-cpp-python is installed (`pip install '.[llamacpp]'`, see the README)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _llama():
    try:
        import llama_cpp
    except ImportError as err:
        raise RuntimeError("the llamacpp backend needs llama-cpp-python: see the README's install command") from err
    return llama_cpp


@dataclass
class Row:
    """One input position of a `llama_decode` call: an embedding (or a token id) of one sequence."""

    seq: int
    pos: int
    logits: bool


class LlamaCppModel:
    """A GGUF model and one llama.cpp context with a unified KV cache of `n_ctx` cells (at most the model's training
    context) shared by `n_seq` sequences; decodes batches of embeddings or of token ids and reads their logits. Not
    thread-safe: one thread uses it."""

    def __init__(self, path: Path, *, n_ctx: int, n_seq: int, threads: int | None = None) -> None:
        llama = self.llama = _llama()
        _quiet_logs(llama)
        llama.llama_backend_init()
        model_params = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama.llama_context_default_params()
        # in a unified cache every sequence may reach any cell: more cells than the model was trained on draw a warning
        n_ctx = min(n_ctx, llama.llama_model_n_ctx_train(self.model))
        threads = threads or len(os.sched_getaffinity(0))
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, BATCH_TOKENS, BATCH_TOKENS, n_seq
        params.n_threads = params.n_threads_batch = threads
        params.n_outputs_max_per_seq = 0  # as many as n_outputs_max: scoring asks for every position's logits
        params.kv_unified, params.no_perf, params.embeddings = True, True, False
        self.ctx = llama.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context of {n_ctx} cells for {path}")
        self.n_ctx = llama.llama_n_ctx(self.ctx)
        self.memory = llama.llama_get_memory(self.ctx)
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.n_embd = llama.llama_model_n_embd(self.model)
        self._embd_batch = llama.llama_batch_init(BATCH_TOKENS, self.n_embd, 1)
        self._token_batch = llama.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._embd = np.ctypeslib.as_array(self._embd_batch.embd, shape=(BATCH_TOKENS, self.n_embd))

    def close(self) -> None:
        llama = self.llama
        llama.llama_batch_free(self._embd_batch)
        llama.llama_batch_free(self._token_batch)
        llama.llama_free(self.ctx)
        llama.llama_model_free(self.model)

    def decode_embeddings(self, embeddings: np.ndarray, rows: list[Row]) -> None:
        """One forward pass over `embeddings` (len(rows) x n_embd, at most BATCH_TOKENS), row i at rows[i]."""
        self._embd[: len(rows)] = embeddings
        self._decode(self._embd_batch, rows)

    def decode_tokens(self, tokens: list[int], rows: list[Row]) -> None:
        """One forward pass over token ids (at most BATCH_TOKENS), token i at rows[i]."""
        batch = self._token_batch
        for i, token in enumerate(tokens):
            batch.token[i] = token
        self._decode(batch, rows)

    def logits(self, i: int) -> np.ndarray:
        """The logits (n_vocab,) at row i of the last decode (which must have asked for them), copied."""
        pointer = self.llama.llama_get_logits_ith(self.ctx, i)
        if not pointer:
            raise RuntimeError(f"llama.cpp has no logits for row {i}")
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def greedy(self, ids: list[int], new_tokens: int, seq: int = 0) -> list[int]:
        """llama.cpp's own token path: `new_tokens` greedy tokens after the token ids `ids`, run as sequence `seq`
        from its start (what it held before is dropped)."""
        self.drop_sequence(seq)
        self.decode_tokens(ids, [Row(seq, i, i == len(ids) - 1) for i in range(len(ids))])
        out, last = [], len(ids) - 1
        for step in range(new_tokens):
            out.append(int(self.logits(last).argmax()))
            if step + 1 < new_tokens:
                self.decode_tokens(out[-1:], [Row(seq, len(ids) + step, True)])
                last = 0
        self.drop_sequence(seq)
        return out

    def score(self, embeddings: np.ndarray, seq: int = 0) -> np.ndarray:
        """The logits at every position (T x n_vocab) of `embeddings` (T x n_embd) run as sequence `seq` from its
        start (what it held before is dropped)."""
        self.drop_sequence(seq)
        logits = []
        for start in range(0, len(embeddings), BATCH_TOKENS):
            piece = embeddings[start:start + BATCH_TOKENS]
            self.decode_embeddings(piece, [Row(seq, start + i, True) for i in range(len(piece))])
            logits += [self.logits(i) for i in range(len(piece))]
        self.drop_sequence(seq)
        return np.stack(logits)

    def copy_sequence(self, source: int, target: int) -> None:
        """Make `target` hold `source`'s cells (shared in the unified cache)."""
        self.llama.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def drop_sequence(self, seq: int) -> None:
        """Remove a sequence; cells no other sequence holds become free."""
        self.llama.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def _decode(self, batch, rows: list[Row]) -> None:
        batch.n_tokens = len(rows)
        for i, row in enumerate(rows):
            batch.pos[i] = row.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = row.seq
            batch.logits[i] = row.logits
        status = self.llama.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status}{': no room in the KV cache' if status == 1 else ''})")


def _quiet_logs(llama) -> None:
    """Send llama.cpp's log to Python logging: warnings and errors only (its info lines fill a screen per load)."""
    global _log_callback
    if _log_callback is None:
        @llama.llama_log_callback
        def forward(level: int, text: bytes, _: ctypes.c_void_p) -> None:
            if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                log.log(logging.WARNING if level == 3 else logging.ERROR, text.decode(errors="replace").rstrip())

        _log_callback = forward  # kept alive: llama.cpp holds the pointer
    llama.llama_log_set(_log_callback, ctypes.c_void_p())


_log_callback = None


@dataclass(eq=False)
class Sequence:
    """A request running as llama.cpp sequence `seq`."""

    request: EngineRequest
    answer: Future[Completion]
    seq: int
    cells: int  # KV cells reserved for it: prompt + soft prompt + max_new_tokens
    stream: TextStream
    generator: torch.Generator | None
    position: int = 0  # where its next token goes
    token: int = -1  # its last token, decoded at the next step
    reason: FinishReason | None = None


@dataclass
class ResidentPrefix:
    """A soft prompt's keys and values, held by sequence `seq` (computed from `embeddings`)."""

    embeddings: torch.Tensor
    seq: int
    length: int


class LlamaCppBackend:
    """Continuous batching on one llama.cpp context: at most `max_running` requests decode together, at most
    `max_queue` wait (more raise Overloaded)."""

    def __init__(self, model: LlamaCppModel, runner: ModelRunner, *, max_running: int, max_queue: int) -> None:
        self.model, self.runner = model, runner
        self.max_running, self.max_queue = max_running, max_queue
        self.eos = runner.eos_ids
        self._free_seqs = list(range(max_running))
        self._free_prefix_seqs = list(range(max_running, max_running + PREFIX_SEQUENCES))
        self._prefixes: OrderedDict[str, ResidentPrefix] = OrderedDict()
        self._last_prompt: torch.Tensor | None = None
        self._template: torch.Tensor | None = None  # the leading rows the last two prompts shared
        self._running: list[Sequence] = []
        self._waiting: deque[tuple[EngineRequest, Future[Completion]]] = deque()
        self._reserved = 0  # KV cells reserved by running requests and resident soft prompts
        self._closed = False
        self._step_seconds = 0.05
        self._wake = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="veil-llamacpp", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, runner: ModelRunner, settings: ServerSettings) -> "LlamaCppBackend":
        """llama.cpp on the served model's GGUF, with room for `max_batch_size` requests of the largest size."""
        path = gguf_path(runner.model_id)
        if path is None:
            raise RuntimeError(f"the llamacpp backend runs GGUF models ('smollm2' or a path to a .gguf file), "
                               f"not {runner.model_id!r}; use --backend transformers")
        per_request = settings.max_prompt_tokens + settings.max_new_tokens + 256  # 256: room for a soft prompt
        n_ctx = settings.max_batch_size * per_request + PREFIX_SEQUENCES * 256
        model = LlamaCppModel(path, n_ctx=n_ctx, n_seq=settings.max_batch_size + PREFIX_SEQUENCES,
                              threads=settings.threads)
        if model.n_embd != runner.input_embeddings.shape[1]:
            model.close()
            raise RuntimeError(f"{path} has width {model.n_embd}, the served model {runner.input_embeddings.shape[1]}")
        return cls(model, runner, max_running=settings.max_batch_size, max_queue=settings.max_queue)

    def submit(self, request: EngineRequest) -> Future[Completion]:
        """Queue a request; its future gets the Completion. Raises Overloaded when `max_queue` already wait."""
        answer: Future[Completion] = Future()
        with self._wake:
            if self._closed:
                raise Overloaded("the server is shutting down")
            waiting = sum(not r.cancelled.is_set() for r, _ in self._waiting)
            if waiting >= self.max_queue:
                retry = (waiting / self.max_running + 1) * self._step_seconds * request.params.max_new_tokens
                raise Overloaded(f"{waiting} requests are waiting, the most this server queues", retry_after=retry)
            self._waiting.append((request, answer))
            self._wake.notify()
        return answer

    def close(self) -> None:
        """Finish what runs and waits, then free llama.cpp's memory."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join(timeout=60)
        if not self._worker.is_alive():
            self.model.close()

    # -- the worker thread -----------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._running and not self._waiting and not self._closed:
                    self._wake.wait()
                if self._closed and not self._running and not self._waiting:
                    return
                admitted = self._admit()
            start = time.perf_counter()
            try:
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._step()
            except Exception as err:  # llama.cpp failed: every running request gets the error, the worker lives on
                for s in self._running:
                    if not s.answer.done():
                        s.answer.set_exception(err)
                    self._release(s)
                self._running = []
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - start)

    def _admit(self) -> list[Sequence]:
        """Take the waiting requests that fit (a free sequence and KV cells), oldest first; answer those cancelled
        or past their deadline while they waited without running them. Called holding the lock."""
        admitted, now = [], time.monotonic()
        for request, answer in list(self._waiting):
            if request.cancelled.is_set() or (request.deadline is not None and now > request.deadline):
                self._waiting.remove((request, answer))
                settle(answer, Completion("", (), "cancelled" if request.cancelled.is_set() else "deadline"))
        while self._waiting and self._free_seqs:
            request, answer = self._waiting[0]
            prefix = len(request.prefix.embeddings) if request.prefix else 0
            cells = prefix + len(request.embeds) + request.params.max_new_tokens
            if self._reserved + cells + prefix > self.model.n_ctx:
                if self._running or admitted:
                    break  # wait for running requests to free their cells
                self._waiting.popleft()
                answer.set_exception(Overloaded("the request does not fit in the KV cache"))
                continue
            self._waiting.popleft()
            params = request.params
            generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
            admitted.append(Sequence(request, answer, self._free_seqs.pop(), cells,
                                     TextStream(self.runner.tokenizer, params.stop), generator))
            self._reserved += cells
        return admitted

    def _prefill(self, admitted: list[Sequence]) -> None:
        """Copy each new sequence's soft prompt in, or the keys of the leading rows its prompt shares with recent ones
        (a chat template's public system prompt), and run the rest of its embeddings, in batches of BATCH_TOKENS
        rows; the last row of each asks for logits, from which its first token is drawn."""
        rows: list[Row] = []
        chunks: list[np.ndarray] = []
        last_rows: dict[int, Sequence] = {}  # row index in the pending batch -> the sequence it ends

        def flush() -> None:
            if rows:
                self.model.decode_embeddings(np.concatenate(chunks), rows)
                for i, s in last_rows.items():
                    self._advance(s, self.model.logits(i))
                rows.clear(), chunks.clear(), last_rows.clear()

        self._running += admitted
        for s in admitted:
            done = 0
            if s.request.prefix is not None:
                prefix = self._prefix(s.request.prefix)
                self.model.copy_sequence(prefix.seq, s.seq)
                s.position = prefix.length
            elif (template := self._template_for(s.request.embeds)) is not None:
                self.model.copy_sequence(self._prefix(template).seq, s.seq)
                s.position = done = len(template.embeddings)
            embeds = s.request.embeds.detach().to(torch.float32).numpy()
            while done < len(embeds):
                if len(rows) == BATCH_TOKENS:
                    flush()
                piece = embeds[done:done + BATCH_TOKENS - len(rows)]
                rows += [Row(s.seq, s.position + j, False) for j in range(len(piece))]
                chunks.append(piece)
                done, s.position = done + len(piece), s.position + len(piece)
            rows[-1].logits = True
            last_rows[len(rows) - 1] = s
        flush()
        self._retire()

    def _template_for(self, embeds: torch.Tensor) -> SoftPromptPrefix | None:
        """The leading rows this prompt shares with recent prompts, as a prefix whose keys are computed once: the
        current template when the prompt begins with it, else the rows it shares with the last prompt (at least
        MIN_TEMPLATE_ROWS, and never the prompt's last row, which gives the logits), which become the template."""
        last, self._last_prompt = self._last_prompt, embeds
        template = self._template
        if template is None or len(template) >= len(embeds) or not torch.equal(embeds[:len(template)], template):
            if last is None:
                return None
            n = min(len(last), len(embeds) - 1)
            same = (last[:n] == embeds[:n]).all(dim=1)
            n = n if bool(same.all()) else int(same.to(torch.int8).argmin())
            if n < MIN_TEMPLATE_ROWS:
                return None
            template = self._template = embeds[:n].detach().clone()
        return SoftPromptPrefix(TEMPLATE, template)

    def _step(self) -> None:
        """Every running sequence decodes its last token; each draws its next."""
        live = self._running
        for start in range(0, len(live), BATCH_TOKENS):
            part = live[start:start + BATCH_TOKENS]
            self.model.decode_tokens([s.token for s in part], [Row(s.seq, s.position, True) for s in part])
            for i, s in enumerate(part):
                s.position += 1
                self._advance(s, self.model.logits(i))
        self._retire()

    def _advance(self, s: Sequence, logits: np.ndarray) -> None:
        """Draw the sequence's next token from `logits` and see whether it ends there."""
        token = int(next_tokens(torch.from_numpy(logits)[None], s.request.params, s.generator)[0])
        s.reason = finish_reason(s.request, s.stream, token, self.eos)
        send_text(s.request, s.stream, finished=s.reason is not None)
        s.token = token

    def _retire(self) -> None:
        """Answer and remove the sequences that finished."""
        for s in [s for s in self._running if s.reason is not None]:
            settle(s.answer, Completion(s.stream.final_text, tuple(s.stream.ids), s.reason))
            self._release(s)
            self._running.remove(s)

    def _release(self, s: Sequence) -> None:
        self.model.drop_sequence(s.seq)
        with self._wake:
            self._free_seqs.append(s.seq)
            self._reserved -= s.cells

    def _prefix(self, prefix: SoftPromptPrefix) -> ResidentPrefix:
        """The soft prompt's keys and values in the cache, computed on first use of this version of the artifact
        (a reload loads new tensors: another tensor under the same name is computed anew)."""
        resident = self._prefixes.get(prefix.name)
        if resident is not None and resident.embeddings is prefix.embeddings:
            self._prefixes.move_to_end(prefix.name)
            return resident
        if resident is not None:
            self._evict(prefix.name)
        while not self._free_prefix_seqs:
            self._evict(next(iter(self._prefixes)))
        seq, embeds = self._free_prefix_seqs.pop(), prefix.embeddings.detach().to(torch.float32).numpy()
        for start in range(0, len(embeds), BATCH_TOKENS):
            piece = embeds[start:start + BATCH_TOKENS]
            self.model.decode_embeddings(piece, [Row(seq, start + j, False) for j in range(len(piece))])
        resident = self._prefixes[prefix.name] = ResidentPrefix(prefix.embeddings, seq, len(embeds))
        with self._wake:
            self._reserved += len(embeds)
        return resident

    def _evict(self, name: str) -> None:
        """Drop a soft prompt's own sequence (requests that copied it keep their cells until they finish)."""
        resident = self._prefixes.pop(name)
        self.model.drop_sequence(resident.seq)
        self._free_prefix_seqs.append(resident.seq)
        with self._wake:
            self._reserved -= resident.length
