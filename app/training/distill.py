"""The distillation objective: the private path should predict what the clean model predicts.

KL(p_clean || p_private) at every continuation position, where p_clean is the frozen model's next-token
distribution given the clean prefix (the teacher) and p_private the same model's given what the server
receives (soft prompt + privatized prefix; the student). Unlike next-token loss on the text, it asks the
student to match the teacher's whole distribution, including what the prefix made likely but did not happen.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from app.training.evaluate import continuation_logits, masked_mean


def distillation_kl(model: PreTrainedModel, teacher_prefix: torch.Tensor, student_prefix: torch.Tensor,
                    continuation: torch.Tensor, mask: torch.Tensor | None = None,
                    teacher_context: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """Mean over continuation positions of KL(teacher || student), per example (nats).

    `teacher_prefix` and `student_prefix` are B x P x b and B x P' x b embeddings; the teacher pass takes no
    gradient, so only what `student_prefix` depends on is trained. The teacher pass runs inside
    `teacher_context()` (e.g. a PEFT model's `disable_adapter`, so that the teacher stays the frozen base model).
    """
    with torch.no_grad(), teacher_context():
        teacher = F.log_softmax(continuation_logits(model, teacher_prefix, continuation), dim=-1)
    student = F.log_softmax(continuation_logits(model, student_prefix, continuation), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return masked_mean(kl, mask)
