"""The training loop on a tiny GLM-4-9B-chat checkpoint: loss goes down, a resumed run repeats the
uninterrupted one's losses, SIGTERM checkpoints and exits 143, 2 DDP processes give 1 process's losses, and the
CLI writes the adapter, loss.png and events.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from finetune_models import facts, glm4_checkpoint, write_jsonl

from glmstack.cli.main import main as glmstack_main
from glmstack.finetune.checkpoint import latest_checkpoint
from glmstack.finetune.methods import MethodOptions
from glmstack.finetune.trainer import TrainConfig, train

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return glm4_checkpoint(tmp_path_factory.mktemp("glm4"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "train.jsonl", facts(16)), write_jsonl(folder / "val.jsonl", facts(4))


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_losses(path: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(path) if e["type"] == "step"}  # the last record of each step


def config(base: Path, data: tuple[Path, Path], output: Path, **overrides) -> TrainConfig:
    options = MethodOptions(lora_rank=4, lora_alpha=8, lora_dropout=0.1)
    settings = dict(model=str(base), train=data[0], output=output, max_steps=6, batch_size=2, grad_accum=2,
                    learning_rate=2e-2, warmup_steps=1, options=options, threads=1, progress=False)
    return TrainConfig(**(settings | overrides))


def test_resume_repeats_the_uninterrupted_losses(base: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    train(config(base, data, whole))
    uninterrupted = step_losses(whole / "events.jsonl")
    assert uninterrupted[6] < uninterrupted[1]  # it learns

    # the same run with checkpoints every 2 steps; then its end is thrown away as if killed after step 4
    cut = tmp_path / "cut"
    train(config(base, data, cut, save_every=2))
    checkpoints = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert checkpoints == ["step-000004"]  # older ones are removed once a newer one is in place
    (cut / "events.jsonl").unlink()
    (cut / "adapter_model.safetensors").unlink()
    train(config(base, data, cut, save_every=2, resume=True))
    resumed = step_losses(cut / "events.jsonl")
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert abs(resumed[step] - uninterrupted[step]) <= 1e-6


def test_cli_writes_adapter_loss_curve_and_events(base: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    status = glmstack_main(["finetune", "--model", str(base), "--train", str(data[0]), "--validation", str(data[1]),
                            "--method", "lora", "--output", str(out), "--max-steps", "4", "--batch-size", "4",
                            "--learning-rate", "2e-2", "--eval-every", "2", "--lora-rank", "4",
                            "--target-modules", "query_key_value,dense_h_to_4h", "--threads", "1"])
    assert status == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["dense_h_to_4h", "query_key_value"]
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    records = events(out / "events.jsonl")
    steps = [e for e in records if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert set(steps[0]) == {"type", "step", "total_steps", "trained_tokens", "epoch", "loss", "learning_rate",
                             "tokens_per_s", "elapsed_s", "eta_s"}
    assert steps[-1]["total_steps"] == 4 and steps[-1]["trained_tokens"] > steps[0]["trained_tokens"] > 0
    assert [e["step"] for e in records if e["type"] == "validation"] == [2, 4]
    assert records[-1] == {"type": "done", "adapter_dir": str(out), "steps": 4,
                           "train_loss": pytest.approx(sum(e["loss"] for e in steps) / 4),
                           "trained_tokens": steps[-1]["trained_tokens"]}


def test_bad_data_is_an_error_event_and_status_2(base: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', encoding="utf-8")
    status = glmstack_main(["finetune", "--model", str(base), "--train", str(bad), "--output", str(tmp_path / "o")])
    assert status == 2
    [error] = events(tmp_path / "o" / "events.jsonl")
    assert error["type"] == "error" and "bad.jsonl line 2: response must be a string" in error["message"]


def run_cli(args: list[str], *, nproc: int = 0) -> subprocess.Popen:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc
                else [sys.executable])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    return subprocess.Popen([*launcher, "-m", "glmstack.finetune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "kill-9"])
def test_a_stopped_run_resumes_to_the_uninterrupted_losses(base: Path, data: tuple[Path, Path], tmp_path: Path,
                                                          stop: str) -> None:
    """SIGTERM: a checkpoint of the last finished step, exit 143. kill -9: nothing more is written; the resumed
    run starts from the last periodic checkpoint and redoes the steps after it, to the same losses."""
    common = ["--model", str(base), "--train", str(data[0]), "--max-steps", "8", "--batch-size", "2",
              "--learning-rate", "2e-2", "--threads", "1", "--lora-dropout", "0.1"]
    if stop == "kill-9":
        common += ["--save-every", "2"]
    whole = run_cli([*common, "--output", str(tmp_path / "whole")])
    assert whole.wait(timeout=300) == 0, whole.stdout.read() if whole.stdout else ""

    out = tmp_path / "cut"
    process = run_cli([*common, "--output", str(out)])
    deadline = time.monotonic() + 300
    while not (out / "events.jsonl").exists() or '"step": 3' not in (out / "events.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    if stop == "sigterm":
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143
        [checkpoint] = [e for e in events(out / "events.jsonl") if e["type"] == "checkpoint"]
        assert checkpoint["step"] >= 3 and Path(checkpoint["path"]).is_dir()
    else:
        process.kill()
        assert process.wait(timeout=120) == -signal.SIGKILL
        assert not (out / "adapter_model.safetensors").exists()
        assert latest_checkpoint(out) is not None  # a periodic one (step 2 or later)
    resumed = run_cli([*common, "--output", str(out), "--resume"])
    assert resumed.wait(timeout=300) == 0
    expected, got = step_losses(tmp_path / "whole" / "events.jsonl"), step_losses(out / "events.jsonl")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - expected[step]) <= 1e-6


@pytest.mark.slow
def test_two_ddp_processes_give_one_process_losses(base: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    common = ["--model", str(base), "--train", str(data[0]), "--max-steps", "3", "--grad-accum", "2",
              "--learning-rate", "2e-2", "--threads", "1", "--lora-dropout", "0"]
    one = run_cli([*common, "--batch-size", "4", "--output", str(tmp_path / "one")])
    assert one.wait(timeout=300) == 0, one.stdout.read() if one.stdout else ""
    two = run_cli([*common, "--batch-size", "2", "--output", str(tmp_path / "two")], nproc=2)
    assert two.wait(timeout=300) == 0, two.stdout.read() if two.stdout else ""
    single, ddp = step_losses(tmp_path / "one" / "events.jsonl"), step_losses(tmp_path / "two" / "events.jsonl")
    assert sorted(ddp) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(single[step] - ddp[step]) <= 1e-5
