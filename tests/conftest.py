import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "sample"
# The GPT-2 vocab/merges live in ../shared/data/gpt2 beside the checkout (CI copies shared/
# there too); MEGATRON_SNM_GPT2_DIR overrides.
GPT2_DIR = pathlib.Path(os.environ.get("MEGATRON_SNM_GPT2_DIR", REPO.parent / "shared" / "data" / "gpt2"))


@pytest.fixture
def one_thread():
    """Tiny matrices: more threads only add contention on a shared 2-core CI machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def sample_dir():
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def gpt2_files():
    vocab, merges = GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        pytest.fail(f"GPT-2 tokenizer files not found in {GPT2_DIR} (set MEGATRON_SNM_GPT2_DIR)")
    return vocab, merges


def pytest_addoption(parser):
    parser.addoption("--cuda", action="store_true", help="also run the tests that need a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--cuda"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run pytest --cuda on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory):
    """Tiny checkpoints of every embedding mode and layout, trained with a SentencePiece tokenizer
    (tests/hf_support.py); shared by the export, import and inference-tool tests."""
    from tests.hf_support import build_checkpoints

    return build_checkpoints(str(tmp_path_factory.mktemp("trained")))


def load_tool(name: str):
    """tools/NAME.py as a module, so a test can call its main(argv) in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
