"""distill.py: the KD loss, the frozen teacher, a tiny run end to end, and clear errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import run_script
from torch.utils.data import DataLoader, TensorDataset

from engine.distillation import distillation_loss_fn, kd_loss, prepare_teacher
from engine.loop import train_one_epoch
from models.factory import create_model, resolve_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.distributed import Runtime
from utils.results import read_rows

STUDENT_TRAIN = ("--student", "lcnet_050", "--no-pretrained", "--batch-size", "16", "--workers", "0")  # image size: the teacher's


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def test_kd_loss_equals_the_hand_computed_value():
    student = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [0.0, 0.0, 4.0]]
    targets = [1, 2]
    temperature, weight = 2.0, 0.75
    kl = ce = 0.0
    for s, t, y in zip(student, teacher, targets):
        p_t, p_s = _softmax(t, temperature), _softmax(s, temperature)
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s)) / len(targets)
        ce += -math.log(_softmax(s)[y]) / len(targets)
    expected = weight * temperature**2 * kl + (1 - weight) * ce
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), temperature, weight)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets),
                   temperature, 0.0).item() == pytest.approx(ce, rel=1e-6)
    assert kd_loss(torch.tensor(student), torch.tensor(student), torch.tensor(targets),
                   temperature, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_teacher_sees_its_own_normalisation():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, images):
            seen.append(images)
            return images.mean((2, 3))

    pixels = torch.rand(2, 3, 4, 4)
    student_norm, teacher_norm = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), ([0.5] * 3, [0.5] * 3)
    column = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    loss_fn = distillation_loss_fn(Recorder(), 4.0, 0.9, student_norm, teacher_norm)
    loss_fn(lambda x: x.mean((2, 3)), (pixels - column(student_norm[0])) / column(student_norm[1]), torch.tensor([0, 1]))
    assert torch.allclose(seen[0], (pixels - 0.5) / 0.5, atol=1e-5)


def test_teacher_gets_no_gradient_updates():
    torch.manual_seed(0)
    runtime = Runtime(torch.device("cpu"))
    teacher, _ = create_model(resolve_model("mobilenetv3_small_050"), 11, pretrained=False)
    student, _ = create_model(resolve_model("lcnet_050"), 11, pretrained=False)
    teacher = prepare_teacher(teacher.train(), runtime)
    student = student.to(memory_format=torch.channels_last)
    teacher_before, student_before = copy.deepcopy(teacher.state_dict()), copy.deepcopy(student.state_dict())
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 11, (16,))), batch_size=8)
    norm = ([0.5] * 3, [0.25] * 3)
    loss_fn = distillation_loss_fn(teacher, 4.0, 0.9, norm, norm)
    train_one_epoch(student, loader, torch.optim.SGD(student.parameters(), lr=0.1), runtime, 0, loss_fn)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())  # BatchNorm statistics too
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())


def test_tiny_distillation_with_baseline_end_to_end(trained_run, tmp_path, capsys):
    teacher_path = trained_run / "best.pt"
    teacher = load_checkpoint(teacher_path)["description"]
    code = run_script("distill.py", "--teacher", teacher_path, *STUDENT_TRAIN, "--epochs", "1",
                      "--baseline", "--output-dir", tmp_path)
    assert code == 0
    out = capsys.readouterr().out
    assert f"teacher mobilenetv3_small_050: test acc {teacher.metrics['acc']:.4f}" in out and "KD gain" in out
    rows = read_rows(tmp_path / "results.csv")
    assert [(r["script"], r["method"], r["model"], r["img_size"]) for r in rows] == [
        ("distill", "kd", "lcnet_050", "32"), ("distill", "fp32", "lcnet_050", "32")]
    kd_run, alone_run = (load_checkpoint(r["checkpoint"])["description"] for r in rows)
    for description in (kd_run, alone_run):
        assert description.split == teacher.split and description.class_names == teacher.class_names
    assert kd_run.teacher["checkpoint"] == str(teacher_path)
    assert kd_run.teacher["test_acc"] == pytest.approx(teacher.metrics["acc"])
    assert alone_run.teacher is None
    kd_weights, alone_weights = (load_checkpoint(r["checkpoint"])["model"] for r in rows)
    assert any(not torch.equal(kd_weights[k], alone_weights[k]) for k in kd_weights)  # the teacher changed the training
    assert kd_run.metrics["acc"] == pytest.approx(float(rows[0]["test_acc"]), abs=1e-6)


def test_student_from_a_checkpoint_keeps_its_architecture_keys(trained_run, tmp_path):
    student = load_checkpoint(trained_run / "best.pt")
    student_path = tmp_path / "student.pt"
    save_checkpoint(student_path, student["model"], student["description"].replace(extra={"origin": "kept"}))
    code = run_script("distill.py", "--teacher", trained_run / "best.pt", "--student-checkpoint", student_path,
                      "--workers", "0", "--batch-size", "16", "--epochs", "1", "--output-dir", tmp_path)
    assert code == 0
    (row,) = read_rows(tmp_path / "results.csv")
    assert (row["method"], row["model"], row["pretrained"]) == ("kd", "mobilenetv3_small_050", "True")
    description = load_checkpoint(row["checkpoint"])["description"]
    assert description.extra["origin"] == "kept" and description.script == "distill"
    assert description.metrics["acc"] == pytest.approx(float(row["test_acc"]), abs=1e-6)


def _bad_checkpoint(trained_run, tmp_path, **changes) -> str:
    payload = load_checkpoint(trained_run / "best.pt")
    path = tmp_path / f"student_{'_'.join(changes)}.pt"
    save_checkpoint(path, payload["model"], payload["description"].replace(**changes))
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing teacher", "does not exist"),
        ("foreign teacher", "not a checkpoint of this project"),
        ("image size", "differs from the teacher's 32 px"),
        ("student classes", "distil between models of the same class list"),
        ("student image size", "trained at 64 px and the teacher at 32 px"),
        ("student twice", "--student-checkpoint replaces"),
    ],
)
def test_bad_input_gives_one_clear_line(case, message, trained_run, tmp_path, capsys):
    teacher = str(trained_run / "best.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    classes = load_checkpoint(teacher)["description"].class_names
    args = {
        "missing teacher": ["--teacher", tmp_path / "nope.pt"],
        "foreign teacher": ["--teacher", tmp_path / "foreign.pt"],
        "image size": ["--teacher", teacher, "--img-size", "48"],
        "student classes": ["--teacher", teacher, "--student-checkpoint",
                            _bad_checkpoint(trained_run, tmp_path, class_names=classes[::-1])],
        "student image size": ["--teacher", teacher, "--student-checkpoint", _bad_checkpoint(trained_run, tmp_path, img_size=64)],
        "student twice": ["--teacher", teacher, "--student-checkpoint", teacher, "--alpha", "0.5"],
    }[case]
    assert run_script("distill.py", *args, "--output-dir", tmp_path) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(error_lines) == 1 and message in error_lines[0]
    assert not (tmp_path / "distill").exists()
