"""A real pretrained run shared by the predict, export, finetune and report tests: the real trainer on the real
WikiText-2 shards, small enough to train in seconds on a CPU."""

import contextlib
from pathlib import Path

import pytest
import torch

# 2 layers x 64 wide: big enough to learn token frequencies and a little context, small enough for ~15 s of CPU.
PRETRAIN = dict(size="tiny", layers=2, hidden=64, heads=2, steps=120, batch_size=32, eval_every=40, eval_rows=256,
                log_every=10, save_every=60, keep_last=5, precision="fp32", device="cpu", seed=0)


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine punishes two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread():
    """Every test here: tiny matmuls gain nothing from threads, and when other processes share the cores, OpenMP
    workers waiting at barriers slow these tests twentyfold."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, wiki_shards) -> Path:
    """A run of `berttrain run` on wiki_shards: metrics with evaluations, checkpoints at steps 60 and 120."""
    from train.config import TrainConfig
    from train.loop import run

    run_dir = tmp_path_factory.mktemp("use") / "pretrained"
    with one_thread():
        run(TrainConfig(shards=str(wiki_shards), run_dir=str(run_dir), **PRETRAIN), progress=False)
    return run_dir


# One layer: what the tests of faults and locks need is a real run with checkpoints, made in a second or two.
TINY_RUN = dict(size="tiny", layers=1, hidden=64, batch_size=16, eval_every=0, log_every=1, precision="fp32",
                device="cpu", seed=3)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, wiki_shards) -> Path:
    """A three-step run of TINY_RUN on wiki_shards with its one checkpoint, to export and fine-tune from."""
    from train.config import TrainConfig
    from train.loop import run

    run_dir = tmp_path_factory.mktemp("tiny") / "tiny"
    with one_thread():
        run(TrainConfig(shards=str(wiki_shards), run_dir=str(run_dir), steps=3, save_every=3, **TINY_RUN),
            progress=False)
    return run_dir


@pytest.fixture(scope="session")
def hf_export(tmp_path_factory, pretrained_run) -> Path:
    """`berttrain export` of the pretrained run: a Hugging Face directory."""
    from train.hf.export import export_hf

    return Path(export_hf(pretrained_run, tmp_path_factory.mktemp("hf") / "bert")["out_dir"])


@pytest.fixture(scope="session")
def cli():
    """The `berttrain` group."""
    from train.cli import main

    return main
