"""Weights and checkpoints never run code: safetensors only, foreign pickles through
``torch.load(weights_only=True)``, every payload refused with a clear error before it runs
. Also a source scan: no loader in medvit unpickles."""

from __future__ import annotations

import ast
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from medvit.engine.checkpoint import (
    CorruptCheckpointError,
    load_checkpoint,
    load_state_dict_file,
    load_weights,
    save_checkpoint,
    save_weights,
)
from medvit.engine.pretrained import load_pretrained
from medvit.errors import CheckpointError, MedvitError
from medvit.models.vit import build_vit

MEDVIT = Path(__file__).resolve().parents[1] / "medvit"


class _Payload:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _evil_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    sd = _net().state_dict()
    files = {}
    files["zip_toplevel"] = tmp_path / "a.pt"
    torch.save(_Payload(marker), files["zip_toplevel"])
    files["zip_nested"] = tmp_path / "b.pth"
    torch.save({"state_dict": dict(sd), "hparams": _Payload(marker)}, files["zip_nested"])
    files["zip_eval"] = tmp_path / "c.ckpt"
    torch.save({"model": dict(sd), "x": [_EvalPayload(marker)]}, files["zip_eval"])
    files["legacy"] = tmp_path / "d.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, files["legacy"], _use_new_zipfile_serialization=False)
    files["raw_pickle"] = tmp_path / "e.bin"
    files["raw_pickle"].write_bytes(pickle.dumps({"w": torch.zeros(2), "x": _Payload(marker)}))
    files["raw_pickle_proto0"] = tmp_path / "f.pth"
    files["raw_pickle_proto0"].write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    return files


def test_pickle_payloads_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for name, path in _evil_files(tmp_path, marker).items():
        with pytest.raises(CheckpointError) as info:
            load_state_dict_file(path)
        message = str(info.value)
        assert str(path) in message, name
        assert "refusing to load" in message or "not a readable PyTorch checkpoint" in message, (name, message)
        assert not marker.exists(), f"{name}: the payload ran"


def test_payload_renamed_to_safetensors_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    for name, path in _evil_files(tmp_path, marker).items():
        disguised = path.with_name(path.stem + f"_{name}.safetensors")
        disguised.write_bytes(path.read_bytes())
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_state_dict_file(disguised)
        with pytest.raises(CheckpointError):
            load_weights(disguised, _net())
    assert not marker.exists()


def test_load_weights_accepts_only_safetensors(tmp_path):
    torch.save(_net().state_dict(), tmp_path / "model.pt")  # an honest pickle: still not accepted as weights
    with pytest.raises(CheckpointError, match="must be a .safetensors file"):
        load_weights(tmp_path / "model.pt", _net())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors", _net())


def test_vit_init_from_a_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    model = build_vit("tiny", num_classes=2, img_size=32, patch_size=8)
    evil = tmp_path / "encoder.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items()}, "args": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_pretrained(model, evil)
    assert not marker.exists()
    # The honest weights-only form of the same file loads.
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "honest.pth")
    assert load_pretrained(model, tmp_path / "honest.pth")["unexpected"] == []


def _safetensors_header_bomb(path: Path) -> None:
    header = b'{"w": {"dtype": "F32", "shape": [1000000000, 1000000000], "data_offsets": [0, 4]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def test_hostile_safetensors_files(tmp_path):
    bomb = tmp_path / "bomb.safetensors"
    _safetensors_header_bomb(bomb)
    huge = tmp_path / "huge_header.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(1000))
    for path in (bomb, huge, empty, junk):
        with pytest.raises(CheckpointError):
            load_state_dict_file(path)
        with pytest.raises(CheckpointError):
            load_weights(path, _net())


def test_cut_short_weights_are_never_taken_as_valid(tmp_path):
    """A weights file or checkpoint cut at any offset (full disk, crash during a copy) is refused."""
    net = _net()
    weights = save_weights(tmp_path / "model.safetensors", net, {"note": "x"})
    full = weights.read_bytes()
    for cut in (0, 1, 8, len(full) // 2, len(full) - 1):
        weights.write_bytes(full[:cut])
        with pytest.raises(CorruptCheckpointError):
            load_weights(weights, _net())
        sidecar = weights.with_suffix(".json")
        kept = sidecar.read_bytes()
        sidecar.unlink()  # no sidecar: safetensors' own structure check still refuses it
        with pytest.raises(CheckpointError):
            load_weights(weights, _net())
        sidecar.write_bytes(kept)
    weights.write_bytes(full[:-4] + bytes(b ^ 0xFF for b in full[-4:]))  # a flipped tail: same size
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        load_weights(weights, _net())
    weights.write_bytes(full)
    assert load_weights(weights, _net())["note"] == "x"

    ckpt = save_checkpoint(tmp_path / "ck" / "last", net, state={"epoch": 1})
    sidecar = ckpt.with_suffix(".json")
    full, side = ckpt.read_bytes(), sidecar.read_text()
    for cut in (0, len(full) // 3, len(full) - 1):
        ckpt.write_bytes(full[:cut])
        with pytest.raises(CorruptCheckpointError):
            load_checkpoint(ckpt, _net())
    ckpt.write_bytes(full)
    for cut in (0, len(side) // 2, len(side) - 2):
        sidecar.write_text(side[:cut])
        with pytest.raises(CorruptCheckpointError):
            load_checkpoint(ckpt, _net())
    sidecar.write_text(side)
    assert load_checkpoint(ckpt, _net())["epoch"] == 1


def test_errors_are_medvit_errors_with_the_path(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"PK\x03\x04broken zip")
    with pytest.raises(MedvitError, match="x.pt"):
        load_state_dict_file(bad)


# ------------------------------------------------------------------ the code base never unpickles


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_source_has_no_unsafe_loader():
    """Every torch.load passes weights_only=True; np.load passes allow_pickle=False; nothing
    calls pickle/joblib/dill loaders, yaml.load or yaml.unsafe_load."""
    offences = []
    for path in sorted(MEDVIT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, owner, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(MEDVIT.parent)}:{node.lineno}"
            if owner == "torch" and name == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    offences.append(f"{where} torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load":
                v = kw.get("allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    offences.append(f"{where} np.load without allow_pickle=False")
            if owner in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") and name in ("load", "loads",
                                                                                                  "open"):
                offences.append(f"{where} {owner}.{name}")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
                offences.append(f"{where} yaml.{name}")
            if owner == "pd" and name == "read_pickle":
                offences.append(f"{where} pd.read_pickle")
    assert offences == [], "\n".join(offences)


def test_safetensors_zip_detection_is_not_fooled(tmp_path):
    """A ZIP (the torch format) given the .safetensors name is not read through torch.load."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buf)
    path = tmp_path / "w.safetensors"
    path.write_bytes(buf.getvalue())
    assert zipfile.is_zipfile(path)
    with pytest.raises(CheckpointError):
        load_state_dict_file(path)
    assert not marker.exists()
