"""The LoRA-student benchmark (bench/distill_lora.py) on the tiny model: the teacher stays the frozen base model,
only the adapter and the prompt are trained, and a few-step run trains, scores and tabulates both students."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.reconstruction import pca_projection
from app.training.distill import distillation_kl
from app.training.evaluate import PAD, continuation_logits
from app.training.loop import train_loop
from app.training.soft_prompt import SoftPromptConfig, private_prefix_loss
from tests.conftest import tiny_runner
from tests.test_training import SHAPE, corpus

pytest.importorskip("peft")
from bench.distill_lora import ADAPTED_CLEAN, lora_config, lora_student, run, train_student  # noqa: E402


def ids(runner, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, len(runner.tokenizer), (batch, length), generator=torch.Generator().manual_seed(seed))


def config(**fields) -> SoftPromptConfig:
    return SoftPromptConfig(name="d", projection_id="0123456789abcdef", mu=20.0, virtual_tokens=3, objective="distill",
                            floor_data=None, **{**SHAPE, **fields})


def perturb_adapter(model) -> None:
    """LoRA starts as the identity (B = 0); give it weights so that it changes the model's output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))


def test_the_teacher_pass_is_the_frozen_base_model() -> None:
    runner = tiny_runner()
    table = runner.input_embeddings.detach()
    teacher, student, continuation = table[ids(runner, 2, 6, 0)], table[ids(runner, 2, 4, 1)], ids(runner, 2, 5, 2)
    with torch.no_grad():
        base = continuation_logits(runner.model, teacher, continuation)
    with lora_student(runner, lora_config(rank=4, layers=1), seed=0) as model:
        perturb_adapter(model)
        with torch.no_grad():
            adapted = continuation_logits(runner.model, teacher, continuation)
            with model.disable_adapter():
                disabled = continuation_logits(runner.model, teacher, continuation)
            lp = F.log_softmax(base, -1)
            lq = F.log_softmax(continuation_logits(runner.model, student, continuation), -1)
        assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter changes the model
        assert torch.allclose(disabled, base, atol=1e-6)
        expected = (lp.exp() * (lp - lq)).sum(-1).mean(-1)  # KL(frozen base, clean || adapted student)
        kl = distillation_kl(runner.model, teacher, student, continuation, teacher_context=model.disable_adapter)
        assert torch.allclose(kl.detach(), expected, atol=1e-5)
        assert not torch.allclose(distillation_kl(runner.model, teacher, student, continuation).detach(), expected,
                                  atol=1e-3)  # without the context the teacher would be the adapted model
    with torch.no_grad():  # the adapter is gone after the student
        assert torch.allclose(continuation_logits(runner.model, teacher, continuation), base, atol=1e-6)


def test_only_the_adapter_and_the_prompt_get_gradients() -> None:
    runner = tiny_runner()
    projection = pca_projection(runner.input_embeddings.detach(), 8, 2.0)
    prompt = torch.randn(3, 32, requires_grad=True)
    with lora_student(runner, lora_config(rank=4, layers=1), seed=0) as model:
        perturb_adapter(model)  # with B = 0, A would get no gradient
        loss = private_prefix_loss(runner, projection, config(), prompt, "distill", model.disable_adapter)
        loss(ids(runner, 4, 16, 0), torch.Generator().manual_seed(0)).backward()
        lora = {name: p for name, p in runner.model.named_parameters() if "lora_" in name}
        base = {name: p for name, p in runner.model.named_parameters() if "lora_" not in name}
        assert lora and all(".layers.0." in name for name in lora)  # layers_to_transform: the first block only
        assert len(lora) == 2 * 7  # A and B on q, k, v, o and the three MLP projections
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
        assert all(p.grad is None for p in base.values())
        assert prompt.grad is not None and prompt.grad.abs().sum() > 0


def test_train_loop_gives_named_parameters_their_own_rate() -> None:
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    train_loop({"a": a, "b": b}, lambda batch, g: (a + b).sum(), torch.zeros(4, 1),
               steps=3, batch_size=2, lr=0.1, lrs={"b": 0.0}, seed=0, run_key="k")
    assert torch.allclose(a.detach(), torch.full((3,), -0.3), atol=1e-5)  # Adam, constant gradient: lr per step
    assert torch.equal(b.detach(), torch.zeros(3))


def test_a_few_step_run_trains_scores_and_tabulates_both_students(tmp_path: Path, capsys) -> None:
    runner = tiny_runner()
    projection = pca_projection(runner.input_embeddings.detach(), 8, 2.0)
    prompts = ids(runner, 3, 8, 5)
    answers = torch.tensor([[5, 6, 2] + [PAD] * 5, [7, 2] + [PAD] * 6, [8, 9, 10, 2] + [PAD] * 4])
    chat = torch.cat([prompts, answers], 1)
    results_path = tmp_path / "distill-lora.json"
    results = run(runner, projection, config(steps=2), lora_config(rank=4, layers=1), 1e-3, corpus(), chat,
                  {"novel": corpus(seed=1), "wiki": corpus(seed=2)}, results_path, segments=4,
                  save_dir=tmp_path / "saved")
    saved = json.loads(results_path.read_text())
    assert list(saved["cells"]) == ["soft prompt", "soft prompt + LoRA"]
    alone, lora = saved["cells"]["soft prompt"], saved["cells"]["soft prompt + LoRA"]
    assert len(alone["loss_curve"]) == len(lora["loss_curve"]) == 2
    assert lora["trainable_parameters"] > alone["trainable_parameters"] == 3 * 32
    for data in ("novel", "wiki"):
        for row in ("clean prefix", "nothing sent"):  # the base model's rows: the adapter was disabled for them
            assert lora["scores"][data]["nll"][row] == pytest.approx(alone["scores"][data]["nll"][row], abs=1e-6)
        assert ADAPTED_CLEAN in lora["scores"][data]["nll"] and ADAPTED_CLEAN not in alone["scores"][data]["nll"]
        assert lora["scores"][data]["segments"] == 4
    printed = capsys.readouterr().out
    assert results["table"] in printed and printed.count("| soft prompt + LoRA |") == 2
    assert (tmp_path / "saved" / "prompt-lora" / "lora" / "adapter_model.safetensors").exists()
    assert not any("lora_" in name for name, _ in runner.model.named_parameters())  # unloaded after its student


def test_train_student_refuses_a_base_weight_with_a_gradient() -> None:
    runner = tiny_runner()
    projection = pca_projection(runner.input_embeddings.detach(), 8, 2.0)
    pool = ids(runner, 8, 16, 0)
    with lora_student(runner, lora_config(rank=4, layers=1), seed=0) as model:
        runner.model.model.norm.weight.requires_grad_(True)  # a base weight left trainable by mistake
        with pytest.raises(RuntimeError, match="base-model weights got gradients"):
            train_student(runner, projection, config(steps=1), pool, model)
