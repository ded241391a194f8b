"""Hostile .npz and .npy data files (hostile15, issue 15): headers that declare far more data
than the file holds get a clear DataError, never numpy's MemoryError traceback."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from shoal.data.files import load_npz
from shoal.errors import DataError


def _npy(shape: tuple[int, ...], descr: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + data


def _npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    return path


@pytest.mark.parametrize(
    ("members", "key"),
    [
        # np.load allocated 4 TiB (x) or 256 TiB (y) before reading: MemoryError, a traceback
        ({"x.npy": _npy((2**40,), "<f4", b"\0" * 16), "y.npy": _npy((4,), "<i8", b"\0" * 32)}, "x"),
        (
            {"x.npy": _npy((4, 1), "<f4", b"\0" * 16), "y.npy": _npy((2**45,), "<i8", b"\0" * 32)},
            "y",
        ),
    ],
)
def test_a_member_declaring_more_than_it_holds_is_a_clear_error(tmp_path, members, key):
    path = _npz(tmp_path / "lies.npz", members)
    with pytest.raises(DataError, match=rf"array '{key}' declares .* bytes of data but its member"):
        load_npz(path)


def test_a_single_npy_declaring_terabytes_is_a_clear_error(tmp_path):
    # np.load of a .npy file allocates what the header says (MemoryError, a traceback)
    path = tmp_path / "huge.npy"
    path.write_bytes(_npy((2**40,), "<f4", b"\0" * 16))
    with pytest.raises(DataError, match="holds a single array"):
        load_npz(path)


def test_honest_npz_still_loads(tmp_path):
    path = tmp_path / "ok.npz"
    np.savez_compressed(path, x=np.ones((6, 2), np.float32), y=np.array([0, 1, 2, 0, 1, 2]))
    ds = load_npz(path)
    assert ds.x.shape == (6, 2) and ds.classes == 3


def test_predict_serve_model_declaring_terabytes_is_a_clear_error(tmp_path, capsys):
    from shoal.cli.main import main

    path = _npz(tmp_path / "model.npz", {"weights.npy": _npy((2**40,), "<f8", b"\0" * 8)})
    code = main(
        [
            "predict", "serve", "--coordinator", "127.0.0.1:1", "--key", str(tmp_path / "k"),
            "--insecure", "--model", str(path),
        ]
    )  # fmt: skip
    assert code != 0
    assert "cannot read model" in capsys.readouterr().err


LONG = "x" * 300  # longer than a file name may be (ENAMETOOLONG): pathlib raises, not answers


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_a_data_path_too_long_is_a_clear_error(tmp_path, suffix):
    from shoal.data import load_csv

    loader = load_npz if suffix == ".npz" else load_csv
    with pytest.raises(DataError, match="cannot be opened: File name too long"):
        loader(tmp_path / (LONG + suffix))


def test_a_play_text_path_too_long_is_a_clear_error(tmp_path):
    from shoal.data.text import load_play, load_shakespeare

    with pytest.raises(DataError, match="File name too long"):
        load_play(tmp_path / LONG)
    with pytest.raises(DataError, match="File name too long"):
        load_shakespeare(path=tmp_path / LONG)


def test_a_job_data_path_too_long_is_a_clear_error(tmp_path, capsys):
    from shoal.cli.main import main

    job = tmp_path / "job.toml"
    job.write_text(f'[data]\npath = "{LONG}.csv"\npartition = {{ scheme = "iid", nodes = 2 }}\n')
    assert main(["run", str(job)]) == 2  # was an OSError traceback
    assert "File name too long" in capsys.readouterr().err


def test_a_store_path_too_long_is_a_clear_error(tmp_path):
    from shoal.cli.options import open_store
    from shoal.errors import ConfigError

    with pytest.raises(ConfigError, match="File name too long"):
        open_store(str(tmp_path / LONG), create=False)


@pytest.mark.parametrize("noise", [float("nan"), float("inf")])
def test_a_served_model_refuses_noise_that_is_not_finite(noise):
    # shoal predict serve --noise-std nan was accepted (NaN < 0 is false): every score NaN
    from shoal.errors import ConfigError
    from shoal.vertical.prediction import ServedModel

    with pytest.raises(ConfigError, match="noise_std"):
        ServedModel(weights=np.ones(3), bias=0.0, budget_rows=None, noise_std=noise)
