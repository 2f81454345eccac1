"""veil client SDK: privatize prompts on the device (DEL mechanism), account the privacy, talk to the server.

Runs without torch. The public API:

    from client_sdk import PrivateLLMClient, markup
    with PrivateLLMClient("http://127.0.0.1:8000") as client:   # default policy, default ledger
        result = client.generate("What is the capital of France?")          # the whole message private
        result = client.generate([{"role": "user", "content": markup("Email [[Ann Smith|PERSON]] about it")}])
        print(result.text, result.privacy.epsilon, result.privacy.private_tokens, result.bytes_sent)
"""

from client_sdk.accounting import PrivacyReport, privacy_report
from client_sdk.budget import BudgetLedger, PendingCharge
from client_sdk.client import (AsyncGenerationStream, AsyncPrivateLLMClient, GenerationResult, GenerationStream,
                               PrivateLLMClient, default_ledger_path)
from client_sdk.errors import (BudgetExceededError, BundleError, LedgerError, MechanismError, PolicyError,
                               ProtocolError, ServerError, VeilError, WireFormatError)
from client_sdk.mechanism import MechanismParams
from client_sdk.policy import PrivacyPolicy
from client_sdk.spans import Conversation, Message, Part, markup

__all__ = [
    "AsyncGenerationStream",
    "AsyncPrivateLLMClient",
    "BudgetExceededError",
    "BudgetLedger",
    "BundleError",
    "Conversation",
    "GenerationResult",
    "GenerationStream",
    "LedgerError",
    "MechanismError",
    "MechanismParams",
    "Message",
    "Part",
    "PendingCharge",
    "PolicyError",
    "PrivacyPolicy",
    "PrivacyReport",
    "PrivateLLMClient",
    "ProtocolError",
    "ServerError",
    "VeilError",
    "WireFormatError",
    "default_ledger_path",
    "markup",
    "privacy_report",
]
