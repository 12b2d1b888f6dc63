"""The typed run description: old checkpoints load, damaged ones fail with a line naming the field."""
from __future__ import annotations

import pytest
import torch

from models.factory import create_model, model_from_checkpoint, resolve_model
from utils.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from utils.description import SCHEMA, RunDescription, SyntheticSource


def _write_v1(path, description: dict) -> None:
    """A checkpoint file exactly as toolkit versions before the typed description wrote it."""
    model, _ = create_model(resolve_model("mobilenetv3_small_050"), 11, pretrained=False)
    torch.save({"format": FORMAT, "version": 1, "model": model.state_dict(), "description": description}, path)


def test_schema_1_checkpoint_loads_and_rebuilds_its_model(tmp_path, v1_description):
    _write_v1(tmp_path / "old.pt", {**v1_description, "origin": "another tool"})
    payload = load_checkpoint(tmp_path / "old.pt")
    description = payload["description"]
    assert isinstance(description, RunDescription) and description.schema == SCHEMA
    assert description.synthetic == SyntheticSource(per_class=2, img_size=32, zoom=1.0)  # no zoom before --synthetic-zoom
    assert description.extra == {"origin": "another tool"} and description.metrics == {"acc": 0.1}
    assert model_from_checkpoint(payload)(torch.zeros(1, 3, 32, 32)).shape == (1, 11)


def test_round_trip_through_a_weights_only_file(tmp_path, v1_description):
    description = RunDescription.from_dict(v1_description).replace(pruned={"architecture": {}}, extra={"origin": "x"})
    save_checkpoint(tmp_path / "new.pt", {"w": torch.zeros(1)}, description)
    raw = torch.load(tmp_path / "new.pt", weights_only=True)["description"]
    assert raw["origin"] == "x" and raw["schema"] == SCHEMA
    assert raw["synthetic"] == {"per_class": 2, "img_size": 32, "zoom": 1.0, "fabrics": None}
    assert load_checkpoint(tmp_path / "new.pt")["description"] == description


@pytest.mark.parametrize("change, message", [
    ({"img_size": None}, "lacks img_size"),
    ({"num_classes": "11"}, "field 'num_classes'"),
    ({"class_names": ["Normal"]}, "1 class_names for num_classes 11"),
    ({"mean": [0.5, 0.5]}, "mean must be three numbers"),
    ({"split": []}, "field 'split'"),
    ({"synthetic": 3}, "field 'synthetic'"),
    ({"schema": SCHEMA + 1}, "newer than this toolkit"),
])
def test_damaged_description_names_the_field(tmp_path, v1_description, change, message):
    description = {**v1_description, **change}
    if change.get("img_size", 0) is None:
        del description["img_size"]
    _write_v1(tmp_path / "bad.pt", description)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "bad.pt")


def test_empty_file_is_refused_with_a_reason(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable checkpoint .*empty or truncated"):
        load_checkpoint(tmp_path / "empty.pt")
