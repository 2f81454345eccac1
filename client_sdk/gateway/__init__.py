"""The veil gateway: an OpenAI-compatible endpoint on the device, so unmodified OpenAI clients send private prompts.

    veil gateway --server http://veil-host:8000            # then, unchanged:
    OpenAI(base_url="http://127.0.0.1:8787/v1", api_key="unused").chat.completions.create(...)

Every request is privatized by the SDK (`AsyncPrivateLLMClient`) before it leaves the device. Needs the `gateway`
extra (`pip install veil[gateway]`: FastAPI, uvicorn, sse-starlette).
"""

from client_sdk.gateway.app import GatewayConfig, create_gateway
from client_sdk.gateway.modes import MODES

__all__ = ["MODES", "GatewayConfig", "create_gateway"]
