"""veil client SDK: privatize prompts on the device (DEL mechanism), account the privacy, talk to the server.

Runs without torch. The public API:

    from client_sdk import PrivateLLMClient
    with PrivateLLMClient("http://127.0.0.1:8000", mu=5.0, ledger="~/.veil/ledger.db") as client:
        result = client.generate("What is the capital of France?")
        print(result.text, result.privacy.epsilon, result.bytes_sent)
"""

from client_sdk.accounting import PrivacyReport, privacy_report
from client_sdk.budget import BudgetLedger
from client_sdk.client import AsyncPrivateLLMClient, GenerationResult, PrivateLLMClient
from client_sdk.errors import BudgetExceededError, BundleError, ServerError, VeilError, WireFormatError
from client_sdk.mechanism import MechanismParams

__all__ = [
    "AsyncPrivateLLMClient",
    "BudgetExceededError",
    "BudgetLedger",
    "BundleError",
    "GenerationResult",
    "MechanismParams",
    "PrivacyReport",
    "PrivateLLMClient",
    "ServerError",
    "VeilError",
    "WireFormatError",
    "privacy_report",
]
