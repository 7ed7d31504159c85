"""Shared fixtures: synthetic volumes with exact oracles, probe models, real-data locations."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BRAINBAG_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLES = SHARED_DATA / "samples"


def shared(relative: str) -> Path:
    """Path of a file or folder in ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data {path} not available (set BRAINBAG_SHARED_DATA to the shared "
                    "data folder to run this test)")
    return path


def sample(name: str) -> Path:
    """Path of a real scan in ../shared/data/samples, or skip the test saying why."""
    return shared(f"samples/{name}")


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def make_affine(
    zooms=(1.0, 1.0, 1.0), flips=(1, 1, 1), rot=np.eye(3), origin=(-40.0, -50.0, -30.0),
    perm=(0, 1, 2),
) -> np.ndarray:
    """Affine with given voxel sizes, axis flips (e.g. LAS = (-1, 1, 1)), permutation, rotation."""
    m = np.zeros((3, 3))
    for col, axis in enumerate(perm):
        m[axis, col] = zooms[col] * flips[col]
    aff = np.eye(4)
    aff[:3, :3] = rot @ m
    aff[:3, 3] = origin
    return aff


def world_coords(shape, affine) -> np.ndarray:
    """World (x, y, z) of every voxel centre: array (3, *shape)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return xyz.reshape(3, *shape)


LINEAR = np.array([3.0, 2.0, -1.5])


def linear_field(xyz: np.ndarray, base: float = 1000.0) -> np.ndarray:
    """A positive function linear in world coordinates (exact under linear interpolation)."""
    return base + np.tensordot(LINEAR, xyz, axes=1)


def save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


class ProbeModel(nn.Module):
    """A model with BagNet map geometry whose output at map voxel ``i`` is the input value at the
    voxel it is centred on: ``8 i + offset``. An exact oracle for world placement."""

    stride = 8

    def __init__(self, padding: str = "same", rf: int = 9, outputs: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.rf = rf
        self.outputs = outputs
        self.head_index = {"age": 0} if outputs == 1 else {"age": 0, "sex": 1}

    @property
    def map_offset(self) -> float:
        return 0.0 if self.padding == "same" else (self.rf - 1) / 2

    @property
    def min_input(self) -> int:
        return 1 if self.padding == "same" else self.rf

    def map_size(self, n: int) -> int:
        return -(-n // 8) if self.padding == "same" else max(0, (n - self.rf) // 8 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(self.map_offset)
        sizes = [self.map_size(n) for n in x.shape[2:]]
        y = x[:, :, c::8, c::8, c::8][:, :, : sizes[0], : sizes[1], : sizes[2]]
        return y.repeat(1, self.outputs, 1, 1, 1)


@pytest.fixture
def tiny_weights(tmp_path: Path):
    """Factory: a random-initialised narrow BagNet weights file (real architecture, width 4)."""
    from brainbag.network.model import BagNet3D, BagNetConfig
    from brainbag.weights.file import random_weights_meta, save_weights

    def make(rf: int = 9, width: int = 4, heads=("age", "sex"), padding="same") -> Path:
        torch.manual_seed(rf)
        model = BagNet3D(BagNetConfig.for_rf(rf, width=width, heads=tuple(heads),
                                             padding=padding))
        path = tmp_path / f"rand-rf{rf}-w{width}.safetensors"
        save_weights(path, model, random_weights_meta(model, f"random-rf{rf}-w{width}"))
        return path

    return make


@pytest.fixture(autouse=True)
def _own_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own empty folder, never in the folder pytest was started from: a
    `brainbag predict` without --out writes `brainbag-results/` there, and the README's demo
    command leaves one in the clone (issue 23)."""
    monkeypatch.chdir(tmp_path)


# -- network isolation and the local test hub ------------------------------------------------

_REAL_CONNECT = socket.socket.connect
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _loopback_only_connect(self: socket.socket, address) -> None:
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
        raise RuntimeError(
            f"a test tried to connect to {address}: tests must never use the network (the real "
            "HuggingFace Hub included); use the fake_hub fixture"
        )
    return _REAL_CONNECT(self, address)


@pytest.fixture(autouse=True)
def _isolated_from_hub_and_user_caches(monkeypatch, tmp_path_factory):
    """Every test: no real hub (HF_ENDPOINT points at a closed local port, and any non-loopback
    connection raises), no telemetry, and no user manifest, cache, token or offline setting."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                 "BRAINBAG_MANIFEST", "BRAINBAG_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setattr(socket.socket, "connect", _loopback_only_connect)
    # huggingface_hub reads some settings once, at import (maybe before this fixture ran).
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)


@pytest.fixture
def fake_hub(monkeypatch):
    """A local Hub-compatible server (tests/hubserver.py); HF_ENDPOINT and HF_TOKEN point at it."""
    from hubserver import TOKEN, FakeHub

    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield hub
    hub.stop()
