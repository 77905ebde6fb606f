"""Multi-process training through Lightning's own strategies and launchers, on CPU with gloo.

Each run is `python cli.py fit` in a subprocess, as a user would start it. Dropout is off so runs with different
batch layouts are comparable: the MLM loss is normalised by the global count of masked tokens, so 2 ranks x batch B
follow the same trajectory as 1 rank x batch 2B, up to float summation order.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main
from tests.builders.runs import FSDP2, STEPS, fit_args
from tests.helpers import CONFIGS, REPO, cli_env, free_port, run_cli

# Float sums in another order (two half-batches, an all-reduce) move the loss by ~1e-6; this leaves margin while a
# real difference (a per-rank mean instead of the global one, another sample order) moves it by 1e-3 or more.
RTOL = 2e-5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """The sample corpus prepared once, in-process, so the subprocesses only read it."""
    cache = tmp_path_factory.mktemp("mlm_cache")
    root = tmp_path_factory.mktemp("prepare_run")
    main(fit_args(str(cache), root, 4, "--trainer.max_steps=1"))
    return str(cache)


def _losses(root: Path) -> list[float]:
    """train/loss per step from the CSV logger (rank 0 writes it; the value is already the global mean)."""
    (path,) = root.rglob("metrics.csv")
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def _final_state(root: Path) -> dict[str, torch.Tensor]:
    ckpt = next(root.rglob("last.ckpt"))
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def one_process_double_batch(cache_dir: str, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single")
    run_cli(fit_args(cache_dir, root, 16), timeout=300)
    return root


def _assert_same_run(root: Path, reference: Path) -> None:
    ours, theirs = _losses(root), _losses(reference)
    assert len(ours) == len(theirs) == STEPS
    assert ours[-1] < ours[0]  # it trained
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=RTOL, atol=0)
    a, b = _final_state(root), _final_state(reference)
    assert a.keys() == b.keys()
    for key in a:  # six Adam steps carry the losses' ~1e-6 reassociation into the weights
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_ddp_two_processes_equal_one_process_with_twice_the_batch(
    cache_dir: str, one_process_double_batch: Path, tmp_path: Path
) -> None:
    run_cli(fit_args(cache_dir, tmp_path, 8, "--trainer.strategy=ddp", "--trainer.devices=2"), timeout=300)
    _assert_same_run(tmp_path, one_process_double_batch)


@pytest.mark.slow  # about 17 s; the two-process DDP test above keeps the multi-process path in the default run
def test_torchrun_two_nodes_on_localhost(
    cache_dir: str, one_process_double_batch: Path, tmp_path: Path
) -> None:
    """Two "nodes" of one process each, started by torchrun as on two machines; Lightning reads the torchelastic
    environment (rank, world size, master address) and runs DDP across them."""
    port = str(free_port())
    args = fit_args(
        cache_dir, tmp_path, 8, "--trainer.strategy=ddp", "--trainer.devices=1", "--trainer.num_nodes=2"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    master = ["--master-addr=127.0.0.1", f"--master-port={port}"]
    nodes = [
        subprocess.Popen(
            [*torchrun, f"--node-rank={rank}", *master, "cli.py", *args],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
    _assert_same_run(tmp_path, one_process_double_batch)


@pytest.mark.parametrize(
    "experiment, snippet, strategy",
    [
        ("configs/clip/coco_vit_b16.yaml", "ddp", "lightning.pytorch.strategies.DDPStrategy"),
        ("configs/mlm/bert_base.yaml", "fsdp", "lightning_modules.training.strategies.BlockFSDPStrategy"),
        ("configs/clip/coco_vit_b16.yaml", "fsdp2", "lightning_modules.training.strategies.FSDP2Strategy"),
        (
            "configs/speech/librispeech_base.yaml",
            "deepspeed",
            "lightning.pytorch.strategies.DeepSpeedStrategy",
        ),
    ],
)
def test_strategy_snippets_compose_with_experiment_configs(
    experiment: str, snippet: str, strategy: str, capsys: pytest.CaptureFixture
) -> None:
    snippet_file = CONFIGS / "strategy" / f"{snippet}.yaml"
    with pytest.raises(SystemExit) as exit_info:  # in this process: printing needs no fresh interpreter
        main(["fit", "--config", str(REPO / experiment), "--config", str(snippet_file), "--print_config"])
    assert exit_info.value.code in (None, 0)
    config = capsys.readouterr().out
    assert f"class_path: {strategy}" in config
    # the experiment keeps its own settings: the snippet only chooses the strategy
    assert "precision: bf16-mixed" in config


# slow (two processes, ~17 s); the default run keeps the wrap units (test_gpu_path) and the fsdp2 config snippet
@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process_and_consolidate(
    cache_dir: str, one_process_double_batch: Path, tmp_path: Path
) -> None:
    """FSDP2 (`fully_shard` per block, gloo on CPU, float32 so the runs compare exactly) trains as DDP does: the
    same losses and, after `cli.py consolidate` turns its sharded last checkpoint into one file, the same weights.
    The bf16 compute policy of configs/strategy/fsdp2.yaml needs a GPU to be checked."""
    run_cli(fit_args(cache_dir, tmp_path, 8, *FSDP2), timeout=300)
    (folder,) = [p for p in tmp_path.rglob("last.ckpt")]
    assert folder.is_dir() and (folder / ".metadata").is_file()  # sharded: one file per rank
    out = tmp_path / "consolidated.ckpt"
    run_cli(["consolidate", "--ckpt_path", str(folder), "--out", str(out)], timeout=300)
    ours, theirs = _losses(tmp_path), _losses(one_process_double_batch)
    assert len(ours) == STEPS
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=RTOL, atol=0)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["encoder"]["layers"] == 2
    reference = _final_state(one_process_double_batch)
    assert ckpt["state_dict"].keys() == reference.keys()
    for key, value in reference.items():  # as in _assert_same_run: reassociation carried through the steps
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
