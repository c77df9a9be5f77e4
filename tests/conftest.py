"""Fixtures shared by the test modules (plain helpers: helpers.py)."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import yaml

# ultralytics reads its config folder at import: keep it out of the user's home in tests
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="medvit-yolo-"))


@pytest.fixture(scope="module")
def no_network():
    """Every way out (DNS, connect) raises and is recorded."""
    attempts: list[str] = []

    def deny(name):
        def fail(*args, **kwargs):
            attempts.append(f"{name}{args[1:2] if name == 'connect' else args[:1]}")
            raise OSError(f"network disabled in tests ({name})")
        return fail

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", deny("connect"))
    mp.setattr(socket.socket, "connect_ex", deny("connect_ex"))
    mp.setattr(socket, "create_connection", deny("create_connection"))
    mp.setattr(socket, "getaddrinfo", deny("getaddrinfo"))
    yield attempts
    mp.undo()


@pytest.fixture(scope="module")
def detector(tmp_path_factory, no_network):
    """A tiny offline YOLO detector of a synthetic brain study (1 epoch at 32 px):
    ``(study, split, detector folder, network attempts)``."""
    # imported here: conftest loads for every test run, and these pull in torch and ultralytics
    from medvit.data.synth import synthesize
    from medvit.tasks.common import split_stage
    from medvit.tasks.detection import detect_stage

    root = tmp_path_factory.mktemp("det")
    manifest = synthesize("brain", n_patients=16, out_dir=root / "data", seed=1, image_size=32)
    study = root / "s.yaml"
    study.write_text(yaml.safe_dump({"study": "s", "device": "cpu", "results_dir": str(root / "r"),
                                     "evaluation": {"bootstrap": 20}, "tasks": {"brain": {
                                         "manifest": str(manifest), "image_size": 32, "anomaly_ratio": 0.3,
                                         "train": {"batch_size": 8},
                                         "detection": {"enabled": True, "image_size": 32, "epochs": 1,
                                                       "batch_size": 16, "mosaic": 0.25, "conf": 0.01,
                                                       "examples": 4},
                                         "cascade": {"enabled": True, "threshold": 0.0}}}}))
    split = split_stage(study, "brain", root / "brain" / "split.csv")
    out = root / "brain" / "detector"
    # a relative output folder, as Snakemake passes it: ultralytics must not put its run under ./runs/
    cwd = os.getcwd()
    os.chdir(root)
    try:
        detect_stage(study, "brain", split, out.relative_to(root))
    finally:
        os.chdir(cwd)
    return study, split, out, no_network
