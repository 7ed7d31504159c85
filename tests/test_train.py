"""Training: gradient equivalence, resume, interruption, NaN, DDP, outputs that predict loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from synthetic import make_dataset
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.network.model import BagNet3D, BagNetConfig
from brainbag.train.config import TrainConfig
from brainbag.train.record import QuietReporter
from brainbag.train.steps import LossSpec, PooledNet, accumulate_gradients
from brainbag.train.trainer import TrainingInterrupted, run_training
from brainbag.weights.file import load_weights, read_meta

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
#: a tiny run: narrow network, small crops; enough to exercise every mechanism. fp32: the default
#: recipe (ixi-open-v1) trains in bf16, whose rounding the exact comparisons here cannot absorb
TINY = ["--width", "2", "--crop", "16", "16", "16", "--batch-size", "4", "--device", "cpu",
        "--workers", "1", "--precision", "fp32"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 subjects of 24^3 voxels; the table's split column gives 8 train, 3 val, 3 test."""
    return make_dataset(tmp_path_factory.mktemp("tiny"), 14, shape=(24, 24, 24), seed=1,
                        split_every=5)


# (volume side, crop side, epochs): 5 steps of 8 crops per epoch. The first runs in the default
# tier: 4x less work than the second, 28-31 s on the shared 2-core VM with other jobs running
# (load 2-3); seeds 0-6 gave test MAE 0.29-0.55 x the baseline, r 0.82-0.97 (issue 16; with 25
# epochs or 24^3 crops it did not reliably learn). The second is the setting first tuned: seeds
# 0-6 gave 0.11-0.55 x the baseline (r 0.91-0.99), a minute on 2 idle cores but 1154 s on a busy
# one (issue 16), hence slow.
LEARNING = [pytest.param(40, 32, 40, id="fast"),
            pytest.param(48, 40, 80, id="tuned", marks=pytest.mark.slow)]


@pytest.mark.parametrize("side, crop, epochs", LEARNING)
def test_training_learns_age_from_local_texture(tmp_path: Path, side: int, crop: int,
                                                epochs: int) -> None:
    """A narrow RF-9 BagNet trained by `brainbag train` for a few CPU minutes predicts the age of
    held-out subjects (through the predict path) far better than their mean age does."""
    from brainbag.network.inference import InferenceSettings
    from brainbag.train.evaluate import EvaluateSettings, run_evaluate

    data = make_dataset(tmp_path / "data", 60, shape=(side,) * 3, seed=0, split_every=5)
    out = tmp_path / "run"
    config = TrainConfig(data=str(data), out=str(out), rf=9, task="age", width=4,
                         crop=[crop] * 3, batch_size=8, lr=5e-3, lr_step_epochs=0,
                         epochs=epochs, val_every=10, seed=0, device="cpu", workers=2)
    t0 = time.perf_counter()
    result = run_training(config, QuietReporter())
    minutes = (time.perf_counter() - t0) / 60
    ev = run_evaluate(EvaluateSettings(
        data=data, weights=(result.weights,), split="test", out=tmp_path / "eval",
        inference=InferenceSettings(mode="sliding", window=(crop,) * 3, device="cpu"),
        plot=False, force=True))[0]  # synthetic blocks are no brains: predict's checks fail
    rows = ev.rows
    train_ages = [float(line.split("\t")[3]) for line in
                  (out / "splits.tsv").read_text().splitlines()[1:]
                  if line.split("\t")[2] == "train"]
    baseline = float(np.mean([abs(r["age"] - np.mean(train_ages)) for r in rows]))
    mae = ev.metrics["age"]["mae"]
    print(f"trained {result.epochs} epochs in {minutes:.1f} min; test MAE {mae:.2f} y vs "
          f"predict-the-mean {baseline:.2f} y (n {len(rows)}); r {ev.metrics['age']['r']:.2f}")
    assert len(rows) == 12
    assert mae < 0.6 * baseline, (mae, baseline)
    assert ev.metrics["age"]["r"] > 0.7


def _config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    values = dict(data=str(data), out=str(out), width=2, crop=[16, 16, 16], batch_size=4,
                  epochs=3, device="cpu", workers=1)
    values.update(kw)
    return TrainConfig(**values)


def _metrics(out: Path) -> list[list[str]]:
    """metrics.tsv rows without the seconds column (timings differ between runs)."""
    lines = (out / "metrics.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    keep = [i for i, c in enumerate(header) if c != "seconds"]
    return [[row.split("\t")[i] for i in keep] for row in lines]


def test_a_batch_of_16_has_the_gradient_of_16_accumulated_samples() -> None:
    """Per-sample InstanceNorm: one batch of 16 == 16 accumulated single-sample steps
    (the published code's accumulation), exactly in float64."""
    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(17, width=4)).double()
    net = PooledNet(model)
    x = torch.randn(16, 1, 24, 24, 16, dtype=torch.float64)
    targets = torch.stack([torch.randn(16, dtype=torch.float64),
                           torch.randint(0, 2, (16,)).double()], dim=1)
    loss = LossSpec(("age", "sex"), 1.0, 1.0)

    def grads(micro: int) -> tuple[list[torch.Tensor], float]:
        model.zero_grad()
        total = accumulate_gradients(net, x, targets, loss, micro, denominator=16)
        return [p.grad.clone() for p in model.parameters()], float(total)

    batch, batch_loss = grads(16)
    micro, micro_loss = grads(1)
    # the published way, written out: 16 forward/backward passes of one sample, loss / 16
    model.zero_grad()
    for i in range(16):
        out = model.pooled(x[i:i + 1])
        (loss.per_sample(out, targets[i:i + 1]).sum() / 16).backward()
    manual = [p.grad.clone() for p in model.parameters()]
    assert len(batch) == len(manual) == 56
    for a, b, c in zip(batch, micro, manual, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-14)
    assert batch_loss == pytest.approx(micro_loss, rel=1e-12)
    assert any(float(g.abs().max()) > 0 for g in batch)


def test_train_writes_a_run_folder_that_predict_and_evaluate_use(tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(tiny_data), "--out", str(out), "--epochs", "2",
                                 "--task", "both", "--seed", "3", "--data-licence", "synthetic",
                                 *TINY])
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.stdout and "done: 2 epochs" in result.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["MODEL_CARD.md", "best.ckpt", "config.toml", "last.ckpt", "metrics.tsv",
                     "splits.tsv", "weights.safetensors"]
    rows = _metrics(out)
    assert rows[0] == ["epoch", "train_loss", "val_loss", "val_mae", "val_accuracy", "lr"]
    assert [r[0] for r in rows[1:]] == ["1", "2"] and all(r[3] and r[4] for r in rows[1:])

    meta = read_meta(out / "weights.safetensors")
    assert meta.trained and meta.architecture == "bagnet3d" and meta.heads == ["age", "sex"]
    assert meta.arch_kwargs["width"] == 2 and meta.rf == 9
    train_ages = [float(line.split("\t")[3]) for line in
                  (out / "splits.tsv").read_text().splitlines()[1:]
                  if line.split("\t")[2] == "train"]
    assert meta.age_scaling == pytest.approx({"mean": np.mean(train_ages),
                                              "std": np.std(train_ages)})
    t = meta.training
    assert t["licence"] == "synthetic" and t["seed"] == 3 and t["task"] == "both"
    assert t["images"] == {"train": 8, "val": 3} and t["epochs"] in (1, 2)
    assert "'split' column" in t["split"] and t["config"]["crop"] == [16, 16, 16]
    assert meta.code_version and meta.preprocessing["window_xyz"] == [16, 16, 16]
    assert "Age MAE" in (out / "MODEL_CARD.md").read_text()

    image = next((tiny_data.parent / "images").glob("*.nii.gz"))
    pred = runner.invoke(app, ["predict", str(image), "--weights",
                               str(out / "weights.safetensors"), "--out", str(tmp_path / "p"),
                               "--mode", "full", "--force"])  # a 24^3 block is no brain
    assert pred.exit_code == 0, pred.output
    assert "UNTRAINED" not in pred.stderr

    ev = tmp_path / "eval"
    args = ["evaluate", str(tiny_data), "--weights", str(out / "weights.safetensors"),
            "--weights", str(out / "weights.safetensors"), "--split", "test", "--out", str(ev),
            "--mode", "full"]
    refused = runner.invoke(app, args)  # a 24^3 block is no brain: predict's checks fail
    assert refused.exit_code == 1 and not ev.exists()
    line = refused.stderr.strip()
    assert "\n" not in line and "check brain_mask" in line and "(and 2 more of 3 images)" in line
    assert "--force evaluates anyway" in line
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    checks = json.loads((ev / "checks.json").read_text())
    assert len(checks) == 3 and all(c["forced"] and "brain_mask" in c["checks"] for c in checks)
    assert {r["name"] for r in checks[0]["results"]} >= {"values", "brain_mask", "voxel_size"}
    assert "age MAE" in result.stdout and "AUC" in result.stdout
    folders = sorted(p.name for p in ev.iterdir() if p.is_dir())
    assert folders == ["run", "run-2"]
    metrics = json.loads((ev / "run" / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["age"]["n"] == 3 and metrics["sex"]["n"] == 3
    rows = (ev / "run" / "predictions.tsv").read_text().splitlines()
    assert len(rows) == 4 and all(r.split("\t")[2] == "test" for r in rows[1:])
    assert rows[0].split("\t")[-2:] == ["checks", "brain_mask"]
    assert all(r.split("\t")[-2].startswith("fail: ") for r in rows[1:])
    assert all(r.split("\t")[-1] == "nonzero" for r in rows[1:])  # skull-stripped phantoms
    assert (ev / "run" / "age_scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((ev / "table.tsv").read_text().splitlines()) == 3


def test_an_existing_run_needs_resume_and_keeps_its_settings(tiny_data: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_training(_config(tiny_data, out, epochs=1), QuietReporter())
    again = runner.invoke(app, ["train", str(tiny_data), "--out", str(out), *TINY])
    assert again.exit_code == 2 and "--resume" in again.stderr
    other = runner.invoke(app, ["train", str(tiny_data), "--out", str(out), "--resume",
                                "--lr", "0.5", *TINY])
    assert other.exit_code == 2 and "lr = 0.001" in other.stderr
    more = runner.invoke(app, ["train", str(tiny_data), "--out", str(out), "--resume",
                               "--epochs", "2", *TINY])
    assert more.exit_code == 0, more.output
    assert "resumed after epoch 1: continuing with epoch 2" in more.stdout
    assert [r[0] for r in _metrics(out)[1:]] == ["1", "2"]


#: Runs `brainbag train` and SIGKILLs itself when the run's `last.ckpt` of epoch KILL_EPOCH is
#: renamed into place, just before (KILL_WHEN=before) or just after (after) the rename: a kill at
#: an exact point between the files an epoch writes, instead of at whatever moment a poll sees.
_KILLER = """
import os, signal, sys
epoch, when = int(os.environ["KILL_EPOCH"]), os.environ["KILL_WHEN"]
real, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    last = os.path.basename(str(dst)) == "last.ckpt"
    seen[0] += last
    if last and seen[0] == epoch and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
    if last and seen[0] == epoch and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from brainbag.cli import main
sys.argv[0] = "brainbag"
main()
"""


@pytest.fixture(scope="module")
def straight_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 epochs of the tiny run, uninterrupted (the reference of the kill tests)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    args = [sys.executable, "-m", "brainbag", "train", str(tiny_data), "--epochs", "6", *TINY]
    subprocess.run(args + ["--out", str(out)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


@pytest.mark.parametrize("when", ["before", "after"])
def test_resume_after_a_kill_continues_with_identical_losses(
        tiny_data: Path, straight_run: Path, tmp_path: Path, when: str) -> None:
    """kill -9 right before or right after the checkpoint of the best epoch lands, then
    --resume: the same losses and the same (best epoch's) weights as the uninterrupted run.
    Before the fix the checkpoint was written before the weights, so a kill after it left the
    previous best weights, which resume never rewrote."""
    best = read_meta(straight_run / "weights.safetensors").training["best_epoch"]
    killer = tmp_path / "killer.py"
    killer.write_text(_KILLER)
    killed = tmp_path / "killed"
    args = [str(tiny_data), "--epochs", "6", *TINY, "--out", str(killed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_EPOCH": str(best), "KILL_WHEN": when}
    proc = subprocess.run([sys.executable, str(killer), "train", *args], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved = torch.load(killed / "last.ckpt", weights_only=True)["epoch"]
    assert saved == (best if when == "after" else best - 1)
    done = subprocess.run([sys.executable, "-m", "brainbag", "train", *args, "--resume"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert (f"resumed after epoch {saved}" if saved < 6 else "nothing to do") in done.stdout
    assert _metrics(killed) == _metrics(straight_run)
    assert read_meta(killed / "weights.safetensors").training["best_epoch"] == best
    a = load_weights(straight_run / "weights.safetensors").model.state_dict()
    b = load_weights(killed / "weights.safetensors").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _InterruptAt(QuietReporter):
    """Sends this process a real SIGINT after a given step, like Ctrl-C."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if (epoch, step) == self.at:
            os.kill(os.getpid(), signal.SIGINT)


class _Messages(QuietReporter):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


def test_resume_of_a_finished_run_says_nothing_to_do_before_loading_volumes(
        tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """Issue 16: `train --resume` of a finished run loaded every volume first."""
    import brainbag.train.trainer as bt

    out = tmp_path / "run"
    first = run_training(_config(tiny_data, out, epochs=1), QuietReporter())

    def no_loading(self, sets) -> None:
        raise AssertionError("volumes loaded although there is nothing to do")

    monkeypatch.setattr(bt.Trainer, "_load", no_loading)
    said = _Messages()
    again = run_training(_config(tiny_data, out, epochs=1), said, resume=True)
    assert any(m.startswith("nothing to do: 1 of 1 epochs done") for m in said.messages)
    assert (again.epochs, again.best_epoch, again.weights) == (1, first.best_epoch,
                                                                first.weights)


def test_ctrl_c_mid_epoch_saves_and_resume_matches_an_uninterrupted_run(
        tiny_data: Path, tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGINT)  # not always the default: nohup/& ignore SIGINT
    straight = run_training(_config(tiny_data, tmp_path / "a"), QuietReporter())
    with pytest.raises(TrainingInterrupted, match="epoch 2, step 1/2; saved") as info:
        run_training(_config(tiny_data, tmp_path / "b"), _InterruptAt(1, 0))
    assert info.value.exit_code == 130
    ckpt = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)
    assert signal.getsignal(signal.SIGINT) is handler  # training restored it
    said = _Messages()
    resumed = run_training(_config(tiny_data, tmp_path / "b"), said, resume=True)
    assert resumed.resumed_from == 1
    # issue 16: after "interrupted at epoch 2, step 1/2" the resume said "from epoch 1, step 1"
    assert any(m.startswith("resumed from epoch 2, step 1/2: continuing with step 2/2")
               for m in said.messages), said.messages
    assert [r["train_loss"] for r in resumed.history] == [
        r["train_loss"] for r in straight.history]
    assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")


def test_a_nan_loss_stops_with_a_clear_message(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(tiny_data), "--out", str(out), "--lr", "1e30",
                                 "--epochs", "3", *TINY])
    assert result.exit_code == 1
    err = result.stderr.strip()
    assert err.count("\n") == 0 and "not finite" in err and "lower --lr" in err
    assert not (out / "weights.safetensors").exists()


def test_ddp_with_two_gloo_processes_runs_an_epoch_like_one_process(
        tiny_data: Path, tmp_path: Path) -> None:
    """torchrun, 2 CPU processes, gloo: same crops, same batch mean, same losses.

    Both runs use one thread per process: this 2-channel network amplifies float rounding (a
    1-thread and a 2-thread single-process run differ by ~1 % in validation loss after two Adam
    steps), so the comparison is made at equal thread counts with a tolerance of 1e-3."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train = ["-m", "brainbag", "train", str(tiny_data), "--epochs", "1", *TINY]
    subprocess.run([sys.executable, *train, "--out", str(single)], env=env, check=True,
                   capture_output=True, timeout=300)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *train, "--out", str(ddp)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 1 epochs") == 1  # rank 0 reports and writes
    a, b = _metrics(single)[1], _metrics(ddp)[1]
    for x, y in zip(a[1:], b[1:], strict=True):
        assert float(x) == pytest.approx(float(y), rel=1e-3)
    wa = load_weights(single / "weights.safetensors").model.state_dict()
    wb = load_weights(ddp / "weights.safetensors").model.state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


def test_cli_builds_the_config_it_was_asked_for(tmp_path: Path, monkeypatch) -> None:
    import brainbag.train.trainer

    seen: dict[str, Any] = {}

    def fake(config, reporter=None, resume=False, explicit=()):
        seen.update(config=config, resume=resume, explicit=set(explicit))
        return brainbag.train.trainer.TrainResult(out=Path(config.out), epochs=0, best_epoch=None,
                                          best={}, weights=Path("w"))

    monkeypatch.setattr(brainbag.train.trainer, "run_training", fake)
    result = runner.invoke(app, [
        "train", "data.tsv", "--recipe", "camcan-paper", "--out", str(tmp_path / "r"),
        "--rf", "33", "--task", "age", "--epochs", "7", "--batch-size", "8", "--micro-batch",
        "2", "--crop", "96", "96", "64", "--lr", "0.0005", "--device", "cpu", "--seed", "5",
        "--precision", "fp32", "--val-view", "full", "--compile", "--resume"])
    assert result.exit_code == 0, result.output
    c = seen["config"]
    assert (c.data, c.out, c.recipe, c.rf, c.task, c.epochs, c.batch_size, c.micro_batch) == (
        "data.tsv", str(tmp_path / "r"), "camcan-paper", 33, "age", 7, 8, 2)
    assert (c.crop, c.lr, c.device, c.seed, c.precision, c.val_view, c.compile) == (
        [96, 96, 64], 5e-4, "cpu", 5, "fp32", "full", True)
    assert c.weight_decay == 1e-4 and c.split.endswith("recipes/splits/camcan")  # recipe
    assert seen["resume"] and {"rf", "epochs", "lr", "weight_decay"} <= seen["explicit"]
    assert "width" not in seen["explicit"]
    for args in (["--rf", "13"], ["--task", "height"], ["--crop", "0", "8", "8"],
                 ["--recipe", "nope"]):
        bad = runner.invoke(app, ["train", "data.tsv", *args])
        assert bad.exit_code == 2, (args, bad.output)


def test_train_and_evaluate_help_list_their_options() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--recipe", "--split", "--rf", "--task", "--epochs", "--batch-size",
                   "--micro-batch", "--crop", "--lr", "--device", "--precision", "--seed",
                   "--resume", "--compile", "--width", "--val-view", "--data-licence"):
        assert option in result.stdout, option
    result = runner.invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0
    for option in ("--weights", "--split", "--split-file", "--mode", "--out", "--no-plot"):
        assert option in result.stdout, option


def test_weights_record_the_data_actually_used_and_the_fields_of_its_images(
        tmp_path: Path) -> None:
    """Issue 23, items 3 and 6: a 10-image run with --recipe ixi-open-v1 wrote "IXI (57
    subjects ...)" and the recipe's licence into its weights, and its card said "receptive field
    9 mm" where the metadata has 18 mm. The weights now record the images they were trained on
    (names, counts, ages, sexes, sites) and the bias fields the checks judge new scans against."""
    from conftest import save
    from phantom import head, world_bias

    from brainbag.image.checks import measure_bias_field

    folder = tmp_path / "study"
    folder.mkdir()
    rows = ["participant_id\tage\tsex\tt1w\tsite"]
    images = []
    for i, strength in enumerate((None, 0.2, 0.4, 0.6)):
        data, affine, _ = head(bias=world_bias(strength) if strength else None, seed=i)
        images.append(save(data, affine, folder / f"s{i}_T1w.nii.gz"))
        rows.append(f"s{i}\t{30 + 10 * i}\t{'F' if i % 2 else 'M'}\ts{i}_T1w.nii.gz\t"
                    f"{'HH' if i < 3 else 'Guys'}")
    (folder / "participants.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(folder / "participants.tsv"), "--recipe",
                                 "ixi-open-v1", "--out", str(out), "--epochs", "1", *TINY])
    assert result.exit_code == 0, result.output
    assert "bias field of 4 of 4 training images" in result.stdout
    meta = read_meta(out / "weights.safetensors")
    t = meta.training
    assert t["data"] == ("study: 4 images of 4 subjects, ages 30-60, 2 F / 2 M images, sites "
                         "Guys 1, HH 3")
    assert "IXI" not in json.dumps(t) and t["licence"].startswith("not stated")
    assert t["datasets"][0]["age_range"] == [30.0, 60.0]
    assert t["datasets"][0]["sites"] == {"Guys": 1, "HH": 3}
    values = [measure_bias_field(p) for p in images]
    bias = t["statistics"]["bias_field"]
    assert bias["n"] == 4 and bias["min"] == round(min(values), 4)  # type: ignore[type-var]
    assert bias["max"] == round(max(values), 4) and bias["p5"] < bias["p50"] < bias["p95"]  # type: ignore[type-var]
    card = (out / "MODEL_CARD.md").read_text()
    assert meta.rf == 9 and meta.voxel_mm == 2.0 and meta.rf_mm == 18.0
    assert "receptive field 9 voxels = 18 mm at the network's 2 mm voxels" in card
    assert "receptive field 9 mm" not in card
    assert "study: 4 images of 4 subjects" in card
    assert f"{100 * bias['min']:.1f}-{100 * bias['max']:.1f} % over 4 images" in card
