"""Trainers: kill-and-resume bit-identity, signals, config refusal, AMP paths, DDP 2-proc == 1-proc."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from jacfast.losses import DistillationLoss
from jacfast.models import build_model
from jacfast.trainers import (BatchStream, CheckpointMismatchError, Distiller, GradScaled, SupervisedTrainer,
                              TrainingInterrupted, TransferTrainer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: one thread is faster, and immune to other processes on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10


# A training script run as a subprocess: dropout + Jacobian penalty with random projections
# (so the torch RNG matters), checkpoint every step, a pause per step so a kill lands mid-run.
SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    torch.set_num_threads(1)
    from jacfast.models import build_model
    from jacfast.trainers import SupervisedTrainer
    out, final, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(36, 1, 28, 28, generator=g), torch.arange(36) % 10
    torch.manual_seed(0)
    model = build_model("lenet", width=2, dropout=0.3)
    def tick(tr):  # written whole by a rename, so the test never reads a half-written file
        path = os.path.join(out, "progress")
        with open(path + ".tmp", "w") as f:
            f.write(str(tr.step))
        os.replace(path + ".tmp", path)
        time.sleep(pause)
    tr = SupervisedTrainer(model, (x, y), jacobian_weight=0.5, num_projections=1, batch_size=8, epochs=3,
                           steps_per_epoch=4, out_dir=out, checkpoint_every=1, seed=3, progress=False,
                           step_callback=tick)
    tr.fit()
    torch.save(model.state_dict(), final)
""")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    subprocess.run([sys.executable, str(script), str(ref_dir), str(tmp_path / "ref.pt"), "0"], check=True,
                   env=_env(), timeout=120)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(tmp_path / "run.pt"), "0.3"], env=_env())
    progress, deadline = run_dir / "progress", time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and int(progress.read_text()) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]
    assert 5 <= killed_at < 12  # mid-epoch 2 (the step-6 callback runs before its checkpoint)
    subprocess.run([sys.executable, str(script), str(run_dir), str(tmp_path / "run.pt"), "0"], check=True,
                   env=_env(), timeout=120)
    ref, run = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "run.pt")
    assert all(torch.equal(ref[k], run[k]) for k in ref), "resumed weights differ from the uninterrupted run"
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(s) for s in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert [r["loss"] for r in lines] == [r["loss"] for r in ref_lines]
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]  # atomic writes leave no temp files


def _small_trainer(out_dir, **kw):
    torch.manual_seed(0)
    args = dict(batch_size=10, epochs=2, steps_per_epoch=3, out_dir=str(out_dir), progress=False)
    args.update(kw)
    return SupervisedTrainer(build_model("lenet", width=2), toy_data(), **args)


def test_signal_writes_checkpoint_and_resumes(tmp_path):
    def interrupt(tr):
        if tr.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    tr = _small_trainer(tmp_path, step_callback=interrupt)
    with pytest.raises(TrainingInterrupted, match="SIGTERM") as err:
        tr.fit()
    assert err.value.checkpoint and torch.load(err.value.checkpoint, weights_only=False)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = _small_trainer(tmp_path)
    resumed.fit()
    ref = _small_trainer(tmp_path / "ref")
    ref.fit()
    assert resumed.step == 6
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), ref.model.state_dict().values()))


def test_resume_refuses_other_config(tmp_path):
    _small_trainer(tmp_path).fit()
    with pytest.raises(CheckpointMismatchError, match="lr"):
        _small_trainer(tmp_path, lr=0.5).fit()
    with pytest.raises(CheckpointMismatchError, match="optimizer"):
        _small_trainer(tmp_path, optimizer="sgd").fit()
    torch.manual_seed(0)
    other = SupervisedTrainer(build_model("resnet", width=2), toy_data(), batch_size=10, epochs=2,
                              steps_per_epoch=3, out_dir=str(tmp_path), progress=False)
    with pytest.raises(CheckpointMismatchError, match="model"):
        other.fit()


def test_batch_stream_state_roundtrip():
    a = BatchStream(7, 3, seed=5)
    for _ in range(4):
        a.next()
    b = BatchStream(7, 3, seed=0)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.next(), b.next()) for _ in range(10))


def test_evaluate_with_noise_is_deterministic(tmp_path):
    tr = _small_trainer(tmp_path)
    x, y = toy_data(30, seed=1)
    r1 = tr.evaluate(x, y, sigmas=(0.0, 0.3))
    r2 = tr.evaluate(x, y, sigmas=(0.3,))
    assert set(r1) == {0.0, 0.3} and r1[0.3] == r2[0.3] and 0 <= r1[0.0] <= 1


def test_grad_scaled_input_jacobian_survives_fp16_underflow():
    class Tiny(nn.Module):  # outputs ~1e-7: fp16 backward seeds of its scale underflow
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 26 * 26, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1)) * 1e-7

    torch.manual_seed(0)
    net, x = Tiny(), torch.rand(2, 1, 28, 28)

    def jac(model, amp):
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            out = model(xg)
            (g,) = torch.autograd.grad(out[:, 0].sum() * 1e-3, xg)
        return g

    ref = jac(net, False)
    plain, scaled = jac(net, True), jac(GradScaled(net, 2.0 ** 24), True)
    assert scaled.dtype == torch.float32
    assert float(plain.abs().max()) == 0.0  # underflowed without scaling
    assert float((scaled - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_distillation_with_exact_jacobian(tmp_path, amp):
    torch.manual_seed(0)
    teacher, student = build_model("vgg", width=2), build_model("resnet", width=2)
    before = [p.clone() for p in student.parameters()]
    loss = DistillationLoss(teacher, beta=1.0, kind="normalized")
    tr = Distiller(teacher, student, loss, toy_data(), batch_size=10, epochs=1, steps_per_epoch=16, amp=amp,
                   out_dir=str(tmp_path), progress=False)
    if amp == "fp16":  # start too high: the first steps overflow, are skipped, the scale backs off
        tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    rec = tr.fit()[-1]
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert rec["jacobian"] > 0
    if amp == "fp16":
        assert 1 <= rec["skipped_steps"] < 16 and rec["grad_scale"] < 2.0 ** 16


def test_transfer_trainer_trains_adapters(tmp_path):
    from jacfast.losses import TransferLoss

    torch.manual_seed(0)
    teacher, student = build_model("vgg", width=2), build_model("lenet", width=2)
    adapter = nn.Conv2d(2, 2, 1)
    loss = TransferLoss(teacher, student, {"block1": "block1"}, activation_weight=1.0, adapters={"block1": adapter})
    w0 = adapter.weight.clone()
    tr = TransferTrainer(teacher, student, loss, toy_data(), batch_size=10, epochs=1, steps_per_epoch=2,
                         out_dir=str(tmp_path), progress=False)
    rec = tr.fit()[-1]
    assert not torch.equal(w0, adapter.weight) and {"ce", "activation", "attention", "jacobian"} <= set(rec)
    assert len(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["extra"]) == 1


# ---- DDP: torchrun, 2 processes (gloo) vs 1 process over the same global batch -------------
DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from jacfast.losses import DistillationLoss
    from jacfast.models import build_model
    from jacfast.trainers import Distiller
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 1, 28, 28, generator=g), torch.arange(30) % 10
    torch.manual_seed(0)
    teacher, student = build_model("vgg", width=2), build_model("resnet", width=2)
    loss = DistillationLoss(teacher, beta=1.0, kind="normalized", strategy="loop")
    # global batch 9 over 2 processes: uneven slices (5 + 4) must still give the 1-process gradient
    tr = Distiller(teacher, student, loss, (x, y), batch_size=9, epochs=1, steps_per_epoch=4, optimizer="sgd", lr=0.1,
                   out_dir=sys.argv[1], progress=False)
    tr.fit()
    if tr.rank == 0:
        torch.save(student.state_dict(), sys.argv[2])
""")


def test_ddp_two_processes_match_one(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(tmp_path / "one.pt")], check=True,
                   env=_env(), timeout=120)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), str(tmp_path / "two"), str(tmp_path / "two.pt")], check=True, env=_env(),
                   timeout=180)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text())["step"] == 4


def test_resume_refuses_a_retrained_teacher(tmp_path):
    def distiller(teacher_seed):
        torch.manual_seed(teacher_seed)
        teacher = build_model("vgg", width=2)
        torch.manual_seed(0)
        return Distiller(teacher, build_model("lenet", width=2), DistillationLoss(teacher, beta=0.0), toy_data(),
                         batch_size=10, epochs=1, steps_per_epoch=1, out_dir=str(tmp_path), progress=False)

    distiller(1).fit()
    distiller(1).fit()  # same teacher: resumes (nothing left to do)
    with pytest.raises(CheckpointMismatchError, match="teacher_weights"):
        distiller(2).fit()
