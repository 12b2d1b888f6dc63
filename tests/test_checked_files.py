"""Files and settings that cannot be used are one error line that says what to do: checkpoint fields, devices, .pt2
programs, a full disk, a data root that is a file, calibration; artifacts damaged after export are detected."""
from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, TINY_TRAIN, FillsUp, run_script
from test_stream import stub_model

from deploy import formats, onnx_export
from deploy.edge import CHECKSUM_KEY, EdgeClassifier, EdgeModelError
from models.factory import create_model, resolve_model
from models.int8 import CalibrationWarning
from utils.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from utils.description import RunDescription
from utils.distributed import resolve_device
from utils.errors import UserError
from utils.io import WriteError
from utils.operating_point import OperatingPoint


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _checkpoint(path: Path, description: dict, version: object = 1, **extra: object) -> Path:
    """A checkpoint written as by hand (torch.save), so any field can be wrong."""
    model, _ = create_model(resolve_model("mobilenetv3_small_050"), 11, pretrained=False)
    torch.save({"format": FORMAT, "version": version, "model": model.state_dict(), "description": description, **extra}, path)
    return path


@pytest.mark.parametrize("model, family", [("no_such_net_100", None), ("mobilenetv9_alpha0.5", "mobilenetv9")])
@pytest.mark.parametrize("script", ["predict.py", "export.py"])
def test_a_checkpoint_naming_a_model_timm_cannot_build_is_one_line(script, model, family, tmp_path, v1_description, capsys):
    path = _checkpoint(tmp_path / "best.pt", {**v1_description, "model": model, "family": family, "alpha": 0.5})
    args = [tmp_path] if script == "predict.py" else ["--output-dir", tmp_path / "runs"]
    assert run_script(script, "--checkpoint", path, *args) == 2
    (line,) = _error_lines(capsys)
    assert f"'{model}'" in line and "cannot build" in line


@pytest.mark.parametrize("version", ["1", 1.5, None, True])
def test_a_format_version_that_is_not_a_number_is_one_line(version, tmp_path, v1_description, capsys):
    path = _checkpoint(tmp_path / "best.pt", v1_description, version=version)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path)
    assert run_script("predict.py", "--checkpoint", path, tmp_path) == 2
    (line,) = _error_lines(capsys)
    assert "format version" in line


def test_main_resume_of_a_prune_run_says_what_to_do_instead(tmp_path, v1_description, capsys):
    pruned = {**v1_description, "script": "prune", "method": "prune", "pruned": {"architecture": {"conv_stem": 8}}}
    path = _checkpoint(tmp_path / "last.pt", pruned, resume={"epoch": 0})
    assert run_script("main.py", "--resume", path, "--output-dir", tmp_path / "runs") == 2
    (line,) = _error_lines(capsys)
    assert "prune.py run" in line and "main.py --init" in line
    assert not (tmp_path / "runs").exists()


def test_device_resolution_refuses_what_this_machine_lacks():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for text, message in (("cuda:99", "cuda"), ("gpu", "not a device"), ("mps", "cpu or cuda")):
        with pytest.raises(UserError, match=message):
            resolve_device(text)


def test_a_device_this_machine_lacks_is_one_line_in_main(tiny_dataset, tmp_path, capsys):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--device", device, "--output-dir", tmp_path) == 2
    (line,) = _error_lines(capsys)
    assert f"--device {device}" in line and ("no CUDA GPU" in line or "GPU(s)" in line)


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch.export program (.pt2), as quantization-train.py --api pt2e writes beside its int8_ptq.pt."""
    path = tmp_path_factory.mktemp("pt2") / "int8_ptq.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), path)
    return path


@pytest.mark.parametrize("script, flags", [
    ("predict.py", ["--checkpoint", "{program}", "{folder}"]),
    ("export.py", ["--checkpoint", "{program}", "--output-dir", "{folder}"]),
    ("distill.py", ["--teacher", "{program}", "--output-dir", "{folder}"]),
])
def test_a_pt2_program_given_as_a_checkpoint_is_redirected(script, flags, program, tmp_path, capsys):
    assert run_script(script, *[flag.format(program=program, folder=tmp_path) for flag in flags]) == 2
    (line,) = _error_lines(capsys)
    assert "torch.export program" in line and "int8_<mode>.pt" in line and "miniz" not in line


def test_a_full_disk_during_a_checkpoint_save_says_so_and_keeps_the_previous_file(tmp_path, v1_description, monkeypatch):
    description = RunDescription.from_dict(v1_description)
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"w": torch.zeros(4)}, description.replace(epoch=1))
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, mode="r", *args, **kwargs: (
        FillsUp(real_open(file, mode, *args, **kwargs)) if "w" in mode and Path(file).name.startswith(".best.pt.")
        else real_open(file, mode, *args, **kwargs)))
    with pytest.raises(WriteError) as raised:
        save_checkpoint(path, {"w": torch.ones(100_000)}, description.replace(epoch=2))
    monkeypatch.undo()
    assert "No space left on device" in str(raised.value) and "inline_container" not in str(raised.value)
    previous = load_checkpoint(path)
    assert previous["description"].epoch == 1 and torch.equal(previous["model"]["w"], torch.zeros(4))
    assert [file.name for file in tmp_path.iterdir()] == ["best.pt"]  # no temp file left behind


def test_a_data_root_that_is_a_file_is_said_to_be_a_file(tmp_path, capsys):
    archive = tmp_path / "StitchingNet.zip"
    archive.write_bytes(b"PK")
    assert run_script("main.py", *TINY_TRAIN, "--data-root", archive, "--output-dir", tmp_path / "runs") == 2
    (line,) = _error_lines(capsys)
    assert "is a file" in line and "folder" in line and "does not exist" not in line


class Stop(UserError):
    pass


def test_export_warns_about_too_few_calibration_images(trained_run, tmp_path, monkeypatch, capsys):
    """The same CalibrationWarning as quantization-train.py's, before any export work (stopped there to keep it short)."""
    def stop(*args, **kwargs):
        raise Stop("stopped after calibration")

    monkeypatch.setattr(formats, "export_onnx", stop)  # the ONNX row's writer: the first export work
    with pytest.warns(CalibrationWarning, match="ONNX INT8 calibrated on only 1 images"):
        assert run_script("export.py", "--checkpoint", trained_run / "best.pt", "--int8", "--calibration-images", "1",
                          "--workers", "0", "--output-dir", tmp_path) == 2
    assert "stopped after calibration" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch says nothing about a CUDA runtime where there is one")
def test_quiet_hides_torch_no_cuda_runtime_line(tmp_path):
    code = ("import sys; from utils.logs import setup_logging; setup_logging('quiet'); "
            "import torch.utils.cpp_extension")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_HOME": str(tmp_path)}  # a CUDA toolkit without a GPU
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "No CUDA runtime" not in done.stderr
    bare = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "No CUDA runtime" in bare.stderr  # what the setting hides


# --- artifacts damaged after export ---------------------------------------------------------------------------------

def _exported_stub(path: Path) -> Path:
    """The stream tests' stub ONNX model rewritten by the exporter's own writer (which stores the checksum)."""
    onnx_export.stamp_operating_point(stub_model(path), OperatingPoint(0.5, 0.05, 1.0, 0.0, 20, 20))
    return path


def test_an_onnx_file_whose_weights_changed_after_export_is_refused(tmp_path, capsys):
    path = _exported_stub(tmp_path / "model.onnx")
    assert CHECKSUM_KEY in {prop.key for prop in onnx.load(path).metadata_props}
    assert EdgeClassifier(path)(np.full((1, 32, 32, 3), 200, np.uint8)).shape == (1, 2)
    onnx_export.stamp_operating_point(path, None)  # a metadata rewrite keeps it valid
    EdgeClassifier(path)
    model = onnx.load(path)
    gain = next(tensor for tensor in model.graph.initializer if tensor.name == "gain")
    gain.CopyFrom(onnx.numpy_helper.from_array(np.array(8.5, np.float32), "gain"))  # a damaged weight, metadata as it was
    onnx.save(model, path)
    with pytest.raises(EdgeModelError, match="damaged.*checksum"):
        EdgeClassifier(path)
    assert run_script("predict.py", "--onnx", path, tmp_path) == 2
    (line,) = _error_lines(capsys)
    assert "is damaged" in line and "export it again" in line


def test_an_openvino_bin_damaged_or_truncated_after_export_is_one_clear_line(tmp_path):
    from deploy.openvino_export import export_openvino
    from deploy.openvino_runtime import OpenVinoClassifier

    xml = tmp_path / "model.xml"
    export_openvino(_exported_stub(tmp_path / "model.onnx"), xml)
    OpenVinoClassifier(xml)
    weights = xml.with_suffix(".bin")
    intact = weights.read_bytes()
    weights.write_bytes(bytes([intact[0] ^ 0x01]) + intact[1:])
    with pytest.raises(EdgeModelError, match="model.bin' is damaged.*checksum"):
        OpenVinoClassifier(xml)
    weights.write_bytes(intact[:len(intact) // 2])
    with pytest.raises(EdgeModelError) as raised:
        OpenVinoClassifier(xml)
    assert "Incorrect weights in bin file" in str(raised.value) and "Exception from" not in str(raised.value)


def test_a_checkpoint_damaged_after_saving_is_refused_by_its_crc(tmp_path, v1_description, capsys):
    path = tmp_path / "best.pt"
    weights = torch.arange(256, dtype=torch.float32)
    save_checkpoint(path, {"w": weights}, RunDescription.from_dict(v1_description))
    data = bytearray(path.read_bytes())
    data[data.find(weights.numpy().tobytes()) + 512] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    assert run_script("predict.py", "--checkpoint", path, tmp_path) == 2
    (line,) = _error_lines(capsys)
    assert "is damaged" in line and "CRC-32" in line


def test_a_folder_or_a_pickle_given_as_checkpoint_is_one_line_without_unsafe_advice(tmp_path):
    """--checkpoint / --init / --teacher with a run folder, or with a file of pickled objects: say what to give instead,
    and never repeat torch's advice to load with weights_only=False (that would run the file's code)."""
    with pytest.raises(CheckpointError, match=r"is a folder: give the checkpoint file in it \(e\.g\. .*best\.pt\)"):
        load_checkpoint(tmp_path)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "x", "module": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(pickled)
    assert "pickled Python objects" in str(refused.value) and "weights_only" not in str(refused.value)
    assert "\n" not in str(refused.value)
