"""DP-SGD soft prompts on the tiny model: per-example gradients, clipping, noise once per logical step, the reported
epsilon, frozen weights, and the tenants' training budgets."""

from __future__ import annotations

import math
import random

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant
from pydantic import ValidationError

from app.artifacts import SERVER_ONLY, manifests
from app.reconstruction import pca_projection
from app.training.dp_soft_prompt import DPSoftPromptConfig, PromptedModel, default_delta, exact_epochs, \
    train_dp_soft_prompt
from app.training.tenant_budget import BudgetExceeded, TenantBudgets
from tests.conftest import WORDS, tiny_runner

TEXT = " ".join(random.Random(0).choices(WORDS[3:], k=1200))


def config(**fields) -> DPSoftPromptConfig:
    base = dict(name="dp", tenant="acme", projection_id="0" * 16, mu=10.0, target_epsilon=3.0, steps=3,
                batch_size=8, physical_batch_size=4, virtual_tokens=4, prefix_tokens=4, continuation_tokens=4,
                held_out_segments=4, secure_rng=False)
    return DPSoftPromptConfig(**{**base, **fields})


def test_the_prompt_layer_gives_opacus_exact_per_example_gradients() -> None:
    runner = tiny_runner()
    runner.model.requires_grad_(False)
    wrapped = GradSampleModule(PromptedModel(runner.model, torch.randn(3, 32)))
    received, continuation = torch.randn(5, 4, 32), torch.randint(3, len(WORDS), (5, 4))
    wrapped(received, continuation).mean().backward()  # as in training: Opacus undoes the mean
    per_example = wrapped._module.prompt.embeddings.grad_sample
    for i in range(5):
        alone = PromptedModel(runner.model, wrapped._module.prompt.embeddings.detach().clone())
        alone(received[i : i + 1], continuation[i : i + 1]).sum().backward()
        assert torch.allclose(per_example[i], alone.prompt.embeddings.grad, atol=1e-6)


def record_noise(monkeypatch) -> list[tuple[float, torch.Tensor]]:
    """Opacus's noise draws from now on: (std, the clipped gradient sum the noise is added to)."""
    import opacus.optimizers.optimizer as opacus_optimizer

    original, draws = opacus_optimizer._generate_noise, []

    def recording(std, reference, generator=None, secure_mode=False):
        draws.append((std, reference.detach().clone()))
        return original(std, reference, generator, secure_mode)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", recording)
    return draws


@pytest.fixture
def trained(tmp_path, monkeypatch) -> tuple:
    """One DP run on the tiny model, with Opacus's noise draws recorded."""
    runner = tiny_runner()
    table = runner.input_embeddings.detach()
    projection = pca_projection(table, 8, 1.0)
    draws = record_noise(monkeypatch)
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    manifest = train_dp_soft_prompt(runner, projection, config(), TEXT, tmp_path)
    return runner, manifest, draws, before, tmp_path


def test_noise_is_added_once_per_logical_step_at_the_calibrated_scale(trained) -> None:
    _, manifest, draws, _, _ = trained
    dp = manifest["dp"]
    assert dp["steps"] == 3 and len(manifest["loss_curve"]) == 3
    assert len(draws) == 3  # one parameter (the prompt), once per logical step, not per micro-batch
    assert all(std == pytest.approx(dp["noise_multiplier"] * dp["max_grad_norm"]) and summed.shape == (4, 32)
               for std, summed in draws)


def test_an_empty_poisson_batch_is_a_noise_only_step_the_accountant_counts(tmp_path, monkeypatch) -> None:
    # 143 training segments sampled at rate 1/143: with this seed the second logical batch has no example (about
    # one batch in e does), which used to fail in Opacus with "Per sample gradient is not initialized"
    runner = tiny_runner()
    draws = record_noise(monkeypatch)
    steps: list[tuple[int, float | None]] = []
    manifest = train_dp_soft_prompt(runner, pca_projection(runner.input_embeddings.detach(), 8, 1.0),
                                    config(seed=2, batch_size=1, physical_batch_size=1, steps=2), TEXT, tmp_path,
                                    on_step=lambda step, loss: steps.append((step, loss)))
    dp = manifest["dp"]
    assert manifest["train_segments"] == 143 and dp["sample_rate"] == 1 / 143
    assert [step for step, _ in steps] == [1, 2] and steps[0][1] > 0 and steps[1][1] is None
    assert manifest["loss_curve"] == [steps[0][1], None]
    # noise once per logical step, the empty one included, where it is all there is: the clipped sum over no examples
    assert len(draws) == 2 and draws[0][1].abs().sum() > 0 and torch.equal(draws[1][1], torch.zeros(4, 32))
    # and the epsilon reported is an independent accountant's for both steps
    accountant = PRVAccountant()
    accountant.history = [(dp["noise_multiplier"], dp["sample_rate"], 2)]
    assert dp["steps"] == 2 and dp["epsilon"] == pytest.approx(accountant.get_epsilon(dp["delta"]), rel=1e-6)


def test_the_reported_epsilon_meets_the_target_and_the_model_is_untouched(trained) -> None:
    runner, manifest, _, before, out = trained
    dp = manifest["dp"]
    assert 0 < dp["epsilon"] <= dp["target_epsilon"] == 3.0
    assert dp["delta"] == default_delta(manifest["train_segments"])
    assert dp["sample_rate"] == 1 / math.ceil(manifest["train_segments"] / 8)  # one of the loader's batches
    assert dp["trained_parameters"] == 4 * 32
    assert all(torch.equal(before[k], v) for k, v in runner.model.state_dict().items())
    assert not any(p.requires_grad for p in runner.model.parameters())
    assert (out / "dp" / "adapter_model.safetensors").exists()
    kept = manifests(out)["dp"]  # what is listed and released: nothing measured on the tenant's data without DP
    assert not SERVER_ONLY & kept.keys() and kept["dp"] == dp


def test_per_example_gradients_are_clipped_before_they_are_summed(monkeypatch) -> None:
    import opacus.optimizers.optimizer as opacus_optimizer
    from opacus import PrivacyEngine

    runner = tiny_runner()
    runner.model.requires_grad_(False)
    monkeypatch.setattr(opacus_optimizer, "_generate_noise",
                        lambda std, reference, generator=None, secure_mode=False: torch.zeros_like(reference))
    data = torch.utils.data.TensorDataset(torch.randn(40, 4, 32), torch.randint(3, len(WORDS), (40, 4)))
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    model = PromptedModel(runner.model, torch.randn(3, 32) * 10)
    clip = 1e-6  # far below any one example's gradient norm
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=clip, poisson_sampling=False)
    received, continuation = next(iter(loader))
    private(received, continuation).mean().backward()
    assert private._module.prompt.embeddings.grad_sample.flatten(1).norm(dim=1).min() > 100 * clip
    optimizer.step()
    # with the noise zeroed, the update is the mean of clipped per-example gradients
    assert model.prompt.embeddings.grad.norm() <= clip * len(received) / 10 + 1e-9


def test_exact_epochs_makes_opacus_plan_exactly_the_steps() -> None:
    for steps, batches in ((3, 7), (100, 3), (29, 49), (1, 1)):
        assert int(exact_epochs(steps, 1 / batches) / (1 / batches)) == steps


def test_configs_are_validated() -> None:
    with pytest.raises(ValidationError):
        config(physical_batch_size=32, batch_size=8)
    with pytest.raises(ValidationError):
        config(tenant="../etc")
    with pytest.raises(ValidationError):
        config(target_epsilon=0)


def test_a_tenant_cannot_spend_past_their_limit(tmp_path) -> None:
    budgets = TenantBudgets(tmp_path / "budgets.json", default_limit=10.0)
    budgets.charge("acme", "job-1", 8.0, 1e-5)
    with pytest.raises(BudgetExceeded, match="2 of 10"):
        budgets.charge("acme", "job-2", 3.0, 1e-5)
    assert budgets.get("acme").spent == 8.0  # the refused job charged nothing
    budgets.charge("other", "job-3", 3.0, 1e-5)  # budgets are per tenant
    budgets.set_limit("acme", 12.0)
    reopened = TenantBudgets(tmp_path / "budgets.json", default_limit=10.0)  # persisted
    assert reopened.charge("acme", "job-2", 3.0, 1e-5).report()["remaining"] == pytest.approx(1.0)
