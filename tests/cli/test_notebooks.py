"""The notebooks run top to bottom on CPU and show what they promise; the committed files carry no outputs."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

from tests.helpers import REPO

NOTEBOOKS = REPO / "notebooks"

NAMES = [
    "01_mlm_quickstart.ipynb",
    "02_clip_retrieval.ipynb",
    "03_speech_text.ipynb",
    "04_attention_maps.ipynb",
]


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    # one thread per kernel: on a small shared machine more threads only fight over the cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' caches (tempfile.mkdtemp) land here
    monkeypatch.setenv("WANDB_MODE", "disabled")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    print(f"{name}: {time.perf_counter() - start:.0f} s")
    return nb


def _outputs(cell) -> list:
    return cell.get("outputs", [])


def _images(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in _outputs(cell))


def _text(cell) -> str:
    return "".join(
        out.get("text", "") + "".join(out.get("data", {}).get("text/plain", "")) for out in _outputs(cell)
    )


def _check_ran(nb) -> None:
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    errors = [out for c in code for out in _outputs(c) if out.output_type == "error"]
    assert not errors, errors


def _cell(nb, startswith: str):
    return next(c for c in nb.cells if c.cell_type == "code" and startswith in c.source)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stripped(name: str) -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow  # about 12 s (a kernel and a short training); every notebook's stripped-output check stays in the default run
def test_04_attention_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute("04_attention_maps.ipynb", tmp_path, monkeypatch)
    _check_ran(nb)
    assert "hidden: (1, " in _text(_cell(nb, "need_weights=True"))
    assert _images(_cell(nb, "def draw(")) == 1
    assert _images(_cell(nb, "pattern = {")) == 1


@pytest.mark.slow
def test_01_mlm_quickstart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute("01_mlm_quickstart.ipynb", tmp_path, monkeypatch)
    _check_ran(nb)
    masked = _text(_cell(nb, "batch = next(iter(dm.train_dataloader()))"))
    assert masked.count("original: [CLS]") == 3 and "[MASK]" in masked
    assert _images(_cell(nb, "def series(")) == 1
    filled = _text(_cell(nb, "def fill_mask("))
    assert filled.count("[MASK] 1:") == 3


@pytest.mark.slow
def test_02_clip_retrieval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute("02_clip_retrieval.ipynb", tmp_path, monkeypatch)
    _check_ran(nb)
    assert _images(_cell(nb, "def show_retrievals(")) == 1
    assert _images(_cell(nb, "heat map")) == 1
    # the written embeddings: every validation image once (the shapes set's 200), searched by text
    assert '"image": 200' in _text(_cell(nb, "PredictionWriter(str(out))"))
    assert _images(_cell(nb, "def search(")) == 1


@pytest.mark.slow
def test_03_speech_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute("03_speech_text.ipynb", tmp_path, monkeypatch)
    _check_ran(nb)
    assert _images(_cell(nb, "log-mel")) == 1
    assert _images(_cell(nb, "heat map")) == 1
