"""Training on the tiny model: the mechanism in the loop, the shared loop (resume, cancel), both trainers,
their artifacts (PEFT-loadable soft prompts), the job manager and the `veil train` CLI."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

from app.artifacts import manifests, set_active
from app.reconstruction import TABLE_FILE, load_projections, pca_projection
from app.soft_prompts import load_soft_prompts
from app.training.data import DataError, parse_upload, split_held_out, token_segments
from app.training.jobs import JobManager, JobState
from app.training.loop import Cancelled, CheckpointMismatch, train_loop
from app.training.mechanism import privatize
from app.training.projection import ProjectionConfig, train_projection
from app.training.soft_prompt import SoftPromptConfig, train_soft_prompt
from client_sdk.bundle import sha256_hex
from tests.conftest import tiny_runner

SENTENCES = ["the capital of france is paris .", "paris is a city and a river .", "hello world .",
             "what is the capital of france ?", "the river of paris is a river ."]


def corpus(sentences: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(rng.choice(SENTENCES) for _ in range(sentences))


SHAPE = dict(prefix_tokens=8, continuation_tokens=8, batch_size=4, held_out_segments=4)


def test_privatize_is_unbiased_with_the_mechanism_variance_and_a_straight_through_gradient() -> None:
    z = torch.tensor([0.7, -0.4, 3.0]).repeat(100_000, 1).requires_grad_(True)
    clip, scale, bits = 1.0, 3.0, 4
    out = privatize(z, clip, scale, bits, torch.Generator().manual_seed(0))
    v = torch.tensor([0.7, -0.4, 1.0])  # the last one clipped
    n, variance = len(out), (scale**2 - v**2) / (2**bits - 1)
    # within 5 standard errors: of the mean, sqrt(var/n); of the sample variance, sqrt((m4 - var^2)/n)
    assert ((out.mean(0) - v).abs() <= 5 * (variance / n).sqrt()).all()
    fourth = ((out.detach() - v) ** 4).mean(0)
    assert ((out.var(0) - variance).abs() <= 5 * ((fourth - variance**2) / n).sqrt()).all()
    levels = (out.detach() / scale + 1) * (2**bits - 1) / 2
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # every value is A(2K/u - 1) for an integer K
    out.sum().backward()
    assert z.grad[0].tolist() == [1.0, 1.0, 0.0]  # identity inside the clip, zero where clipped


def test_uploads_parse_as_text_or_jsonl_and_bad_ones_are_refused() -> None:
    assert parse_upload(b"plain text\nmore") == "plain text\nmore"
    assert parse_upload(b'{"text": "a"}\n\n{"text": "b"}\n') == "a\nb"
    for bad, message in [(b"\xff\xfe", "UTF-8"), (b'{"text": 1}', "text"), (b'{"text": "a"}\n{oops', "line 2"),
                         (b"  \n", "no text")]:
        with pytest.raises(DataError, match=message):
            parse_upload(bad)


def test_segments_and_held_out_split(runner) -> None:
    segments = token_segments(corpus(), runner.tokenizer, 16)
    assert segments.shape[1] == 16 and len(segments) > 20
    train, held = split_held_out(segments)
    assert len(train) + len(held) == len(segments) and len(held) >= 1
    with pytest.raises(DataError, match="fewer than one segment"):
        token_segments("hello", runner.tokenizer, 16)


def quadratic_run(tmp_path: Path, steps: int, cancel: threading.Event | None = None, on_step=None,
                  key: str = "k") -> torch.Tensor:
    weight = torch.zeros(3, requires_grad=True)
    data = torch.arange(40.0).view(20, 2)

    def loss(batch, generator):
        noise = torch.randn(3, generator=generator)
        return ((weight - batch.mean() / 20 - noise * 0.1) ** 2).sum()

    train_loop({"w": weight}, loss, data, steps=steps, batch_size=4, lr=0.1, seed=3, run_key=key,
               checkpoint=tmp_path / "ck.pt", checkpoint_every=2, cancel=cancel, on_step=on_step)
    return weight.detach()


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    straight = quadratic_run(tmp_path / "a", steps=10)
    cancel = threading.Event()

    def stop_at_five(step: int, loss: float) -> None:
        if step == 5:
            cancel.set()

    with pytest.raises(Cancelled, match="step 5 of 10"):
        quadratic_run(tmp_path / "b", steps=10, cancel=cancel, on_step=stop_at_five)
    assert torch.load(tmp_path / "b" / "ck.pt", weights_only=True)["step"] == 5
    assert torch.equal(quadratic_run(tmp_path / "b", steps=10), straight)
    with pytest.raises(CheckpointMismatch):
        quadratic_run(tmp_path / "b", steps=10, key="other settings")


def test_projection_training_writes_an_artifact_the_server_loads(tmp_path: Path) -> None:
    runner = tiny_runner()
    config = ProjectionConfig(name="proj", dim=8, steps=6, mu_min=5, mu_max=20, **SHAPE)
    before = runner.input_embeddings.detach().clone()
    manifest = train_projection(runner, config, corpus(), tmp_path)
    assert torch.equal(runner.input_embeddings, before)  # the LLM is frozen
    assert manifest["steps"] == 6 and len(manifest["loss_curve"]) == 6
    assert all(torch.isfinite(torch.tensor([manifest["held_out_loss"], manifest["held_out_loss_pca"]])))
    assert load_projections(tmp_path, runner) == ([], {"proj": "inactive (not activated)"})  # trained: inactive
    set_active(tmp_path / "proj", True)
    (published,), _ = load_projections(tmp_path, runner)
    assert published.id == manifest["id"] == sha256_hex((tmp_path / "proj" / TABLE_FILE).read_bytes())[:16]
    loaded, pca = published.projection, pca_projection(runner.input_embeddings.detach(), 8, 2.0)
    assert loaded.dim == 8 and not torch.allclose(loaded.encoder, pca.encoder)  # trained away from the PCA start


def test_soft_prompt_training_is_a_peft_prompt_tuning_adapter(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    runner = tiny_runner()
    projection = pca_projection(runner.input_embeddings.detach(), 8, 2.0)
    config = SoftPromptConfig(name="sp", projection_id="0123456789abcdef", mu=20.0, virtual_tokens=5, steps=4,
                              init_text="the capital of france", **SHAPE)
    manifest = train_soft_prompt(runner, projection, config, corpus(), tmp_path)
    assert {"held_out_loss", "held_out_loss_without_prompt", "data_sha256"} <= manifest.keys()
    set_active(tmp_path / "sp", True)
    (prompt,), _ = load_soft_prompts(tmp_path, runner)
    assert (prompt.bits, prompt.mu, prompt.embeddings.shape) == (4, 20.0, (5, 32))
    adapted = peft.PeftModel.from_pretrained(tiny_runner().model, str(tmp_path / "sp"))
    assert torch.equal(adapted.get_prompt_embedding_to_save("default"), prompt.embeddings)


def wait_for(manager: JobManager, job_id: str, state: JobState) -> None:
    job = manager.wait(job_id, timeout=120)
    assert job.state == state, job.error


def test_jobs_survive_a_restart_and_resume_from_their_checkpoint(settings) -> None:
    (settings.data_dir / "wikitext-2").mkdir(parents=True)
    (settings.data_dir / "wikitext-2" / "valid.txt").write_text(corpus())
    reloads: list[int] = []
    runner = tiny_runner()
    manager = JobManager(runner, settings, on_artifact=lambda: reloads.append(1))
    started = threading.Event()
    real_step = runner.model.forward

    def slow_forward(*args, **kwargs):  # slow enough to stop the server mid-run
        started.set()
        threading.Event().wait(0.02)
        return real_step(*args, **kwargs)

    runner.model.forward = slow_forward
    job = manager.submit(ProjectionConfig(name="p", dim=8, steps=40, **SHAPE), activate=True)
    assert started.wait(60)
    manager.close()  # the server stops: the job is checkpointed and marked interrupted
    assert manager.get(job.id).state == JobState.interrupted
    runner.model.forward = real_step
    restarted = JobManager(runner, settings, on_artifact=lambda: reloads.append(1))
    assert restarted.get(job.id).state == JobState.interrupted
    restarted.resume(job.id)
    wait_for(restarted, job.id, JobState.succeeded)
    done = restarted.get(job.id)
    assert done.step == 40 and len(done.losses) == 40 and reloads == [1]
    assert manifests(settings.projection_dir)["p"]["active"] is True
    restarted.close()


def cli_setup(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The tiny model saved as a directory, a corpus, and the VEIL_* variables pointing a server's folders at them."""
    model_dir = tmp_path / "tiny"
    runner = tiny_runner()
    runner.model.save_pretrained(model_dir)
    runner.tokenizer.save_pretrained(model_dir)
    (tmp_path / "data" / "wikitext-2").mkdir(parents=True)
    (tmp_path / "data" / "wikitext-2" / "valid.txt").write_text(corpus())
    folders = dict(CACHE_DIR=tmp_path / "cache", PROJECTION_DIR=tmp_path / "projections",
                   SOFT_PROMPT_DIR=tmp_path / "soft_prompts", DATA_DIR=tmp_path / "data", PROJECTION_DIM=8)
    return model_dir, {f"VEIL_{name}": str(value) for name, value in folders.items()}


def test_veil_train_cli_trains_and_activates(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    model_dir, env = cli_setup(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    shape = ["--prefix-tokens", "8", "--continuation-tokens", "8", "--batch-size", "4"]
    result = CliRunner().invoke(cli, ["train", "projection", "--model", str(model_dir), "--name", "p", "--dim", "8",
                                      "--steps", "3", "--activate", *shape])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and manifests(tmp_path / "projections")["p"]["active"]
    result = CliRunner().invoke(cli, ["train", "soft-prompt", "--model", str(model_dir), "--name", "s",
                                      "--mu", "10", "-m", "4", "--steps", "2", *shape])
    assert result.exit_code == 0, result.output
    manifest = manifests(tmp_path / "soft_prompts")["s"]
    assert manifest["projection_id"] == manifests(tmp_path / "projections")["p"]["id"]  # the served default
    bad = CliRunner().invoke(cli, ["train", "projection", "--model", str(model_dir), "--name", "q",
                                   "--data", "nonsense"])
    assert bad.exit_code != 0 and "unknown corpus" in bad.output
    assert json.loads((tmp_path / "soft_prompts" / "s" / "adapter_config.json").read_text())["num_virtual_tokens"] == 4
    dp = ["train", "dp-soft-prompt", "--model", str(model_dir), "--tenant", "acme", "--epsilon", "6", "--mu", "10",
          "--data", "wikitext-2-valid", "-m", "4", "--steps", "2", "--physical-batch-size", "2", *shape]
    result = CliRunner().invoke(cli, [*dp, "--name", "d"])
    assert result.exit_code == 0 and "charged to tenant 'acme'" in result.output, result.output
    assert manifests(tmp_path / "soft_prompts")["d"]["dp"]["epsilon"] <= 6
    over = CliRunner().invoke(cli, [*dp, "--name", "d2"])  # the default limit is 10: 4 left
    assert over.exit_code != 0 and "4 of 10" in over.output and "d2" not in manifests(tmp_path / "soft_prompts")


def test_shipped_artifacts_are_consistent() -> None:
    from app.settings import ServerSettings

    settings = ServerSettings()
    projections = manifests(settings.projection_dir, "smollm2")
    served = {m["id"] for m in projections.values() if m["active"]}
    prompts = manifests(settings.soft_prompt_dir, "smollm2")
    assert len(served) == 1 and any(m["active"] for m in prompts.values())
    for name, manifest in prompts.items():
        assert manifest["projection_id"] in served, name
        if manifest.get("objective", "next_token") == "next_token":  # what it was trained to lower
            assert manifest["held_out_loss"] < manifest["held_out_loss_without_prompt"], name
        check = manifest["floor_check"]  # every shipped prompt was checked on the held-out novel
        assert check["data"] == "austen-emma" and check["segments"] >= 32, name
        assert check["passes"] or not manifest["active"], name  # none worse than sending nothing is served
        config = json.loads((settings.soft_prompt_dir / name / "adapter_config.json").read_text())
        assert (config["peft_type"], config["token_dim"]) == ("PROMPT_TUNING", 576)


def test_veil_bench_refuses_an_unknown_benchmark() -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, ["bench", "nope"])
    assert result.exit_code != 0 and "unknown benchmark" in result.output


def test_sigkill_mid_training_leaves_no_artifact_and_the_same_command_resumes(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    model_dir, veil_env = cli_setup(tmp_path)
    env = {**os.environ, **veil_env}
    checkpoint = tmp_path / "run.pt"
    command = [sys.executable, "-m", "app.cli", "train", "soft-prompt", "--model", str(model_dir), "--name", "s",
               "--mu", "10", "-m", "4", "--steps", "600", "--prefix-tokens", "8", "--continuation-tokens", "8",
               "--batch-size", "4", "--checkpoint", str(checkpoint)]
    training = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and training.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    training.send_signal(signal.SIGKILL)
    training.wait()
    assert training.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert manifests(tmp_path / "soft_prompts") == {}  # nothing half-written is ever served or listed
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < step < 600

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    manifest = manifests(tmp_path / "soft_prompts")["s"]
    assert manifest["steps"] == 600 and len(manifest["loss_curve"]) == 600  # resumed, not restarted short
