"""The chat templates the device renders: the SDK's own copies of its supported models' templates, chosen by SHA-256.

A chat template is Jinja code, and the bundle's comes from the server. Rendered as sent, a hostile one stalls or
exhausts the device (two nested `range(100000)` loops; a 100,000-character string printed 100,000 times), and
Jinja's sandbox bounds neither time nor memory: its hooks see calls and attributes, not loop iterations, string
concatenation or the work inside filters, and a render running in a thread cannot be stopped. So the device never
runs the server's template: it takes the template's SHA-256 as the name of one it already has, and renders its own
copy (in the sandbox still), whose cost is linear in the messages. A template the SDK does not ship is refused
(`BundleError` when a chat prompt is prepared; `chat=False` still works), unless the app passes the template's text
as `chat_templates=` after vetting it.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

SHIPPED = {
    "SmolLM2-135M-Instruct": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
"""The chat templates of the models the SDK supports, by model, exactly as their servers send them."""


def template_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def known_templates(extra: Iterable[str] = ()) -> dict[str, str]:
    """SHA-256 -> text of every template the device renders: the shipped ones and the app's `extra`."""
    return {template_sha256(text): text for text in (*SHIPPED.values(), *extra)}
