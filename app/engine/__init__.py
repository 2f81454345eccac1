"""The generation engine: what the service hands a backend (`request`), and the backends that generate.

`transformers` (default, `app.engine.transformers`) runs the model in this process with a dynamic batcher and the
soft prompt's key/value cache; `vllm` (`app.engine.vllm`, GPU) runs vLLM's in-process async engine. Both receive
the soft prompt and the reconstructed prompt as tensors in process, never from the network.
"""
