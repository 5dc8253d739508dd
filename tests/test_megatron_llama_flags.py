"""The flags Megatron-LM's Llama-3 script brought in, one by one: --decoupled-lr / --decoupled-min-lr,
--mock-data with --tokenizer-type NullTokenizer --vocab-size, --manual-gc (the whole scripts run in
test_megatron_llama_scripts.py)."""
from __future__ import annotations

import gc
import types

import numpy as np
import pytest
import torch

from megatron_snm.config import parse_args, resolve
from megatron_snm.data.mock_dataset import MOCK_DOCUMENTS, MockDocuments, build_mock_datasets
from megatron_snm.data.tokenizers import build_tokenizer
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import GPTModel, gpt_loss
from megatron_snm.training.engine import TrainEngine
from megatron_snm.training.housekeeping import Housekeeping
from megatron_snm.training.optimizer import param_groups
from megatron_snm.training.trainer import decoupled_lr_schedule, lr_schedule
from tests.model_shapes import tiny as tiny_shape

SHAPE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "10", "--lr", "1e-3",
         "--min-lr", "1e-4", "--lr-warmup-iters", "2"]


@pytest.mark.parametrize("untied", [False, True])
def test_decoupled_lr_reaches_the_input_embedding_and_output_layer_only(untied):
    """Megatron's --decoupled-lr: the token table(s) (is_embedding_or_output_parameter in Megatron) get
    their own learning rate; every other weight keeps --lr. One Adam step moves each weight by about
    its group's learning rate (the first step's update is the sign of the gradient)."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**tiny_shape(untie_embeddings_and_output_weights=untied)))
    tables = {id(model.embedding.word_embeddings.weight)} | ({id(model.output.weight)} if untied else set())
    groups = param_groups(model, weight_decay=0.0, decoupled_lr=True)
    assert {id(p) for g in groups if g["decoupled_lr"] for p in g["params"]} == tables
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(not g["decoupled_lr"] for g in param_groups(model, weight_decay=0.0))  # off without the flag

    engine = types.SimpleNamespace(optimizer=torch.optim.AdamW(groups, eps=1e-12))
    TrainEngine.set_lr(engine, 1e-3, 5e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    gpt_loss(model(tokens), tokens.roll(-1, 1)).backward()
    engine.optimizer.step()
    for name, param in model.named_parameters():
        moved = (param.detach() - before[name]).abs()
        moved = moved[param.grad != 0]  # rows of tokens absent from the batch have no gradient
        expected = 5e-2 if id(param) in tables else 1e-3
        # At most the learning rate, and about it for most entries (a gradient near Adam's eps moves less).
        assert moved.max().item() == pytest.approx(expected, rel=1e-3), name
        assert moved.median().item() == pytest.approx(expected, rel=1e-3), name


def test_decoupled_lr_schedule_has_the_same_shape_with_its_own_peak_and_floor():
    run = resolve(parse_args(SHAPE + ["--decoupled-lr", "5e-3", "--decoupled-min-lr", "4e-4"]), 1)
    main = lr_schedule(run)
    decoupled = decoupled_lr_schedule(main, run)
    assert (decoupled.max_lr, decoupled.min_lr, decoupled.warmup, decoupled.decay) == (5e-3, 4e-4, main.warmup,
                                                                                       main.decay)
    for progress in range(11):  # warm-up, cosine decay, floor: the same fraction of the way for both
        share = (main(progress) - main.min_lr) / (main.max_lr - main.min_lr) if progress > main.warmup else \
            main(progress) / main.max_lr
        expected = decoupled.min_lr + share * (decoupled.max_lr - decoupled.min_lr) if progress > main.warmup else \
            share * decoupled.max_lr
        assert decoupled(progress) == pytest.approx(expected, rel=1e-12)
    # Megatron: without --decoupled-min-lr the floor stays --min-lr; without --decoupled-lr, no group.
    run = resolve(parse_args(SHAPE + ["--decoupled-lr", "5e-3"]), 1)
    assert decoupled_lr_schedule(lr_schedule(run), run).min_lr == 1e-4
    assert decoupled_lr_schedule(main, resolve(parse_args(SHAPE), 1)) is None


def test_null_tokenizer_is_megatrons():
    """Megatron-LM's _NullTokenizer: --vocab-size N ids, the end of document is id N, N + 1 in all."""
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert (tokenizer.vocab_size, tokenizer.eod) == (1001, 1000)
    assert tokenizer.tokenize("3 14 159") == [3, 14, 159] and tokenizer.detokenize([3, 14]) == "3 14"
    with pytest.raises(ValueError, match="NullTokenizer needs --vocab-size"):
        build_tokenizer("NullTokenizer")


def test_mock_documents_are_megatrons(tmp_path):
    """MockGPTLowLevelDataset: 100,000 documents, lengths from default_rng(0) in [1, 4096), document i
    = 1, 2, ..., length - 1 then the eod; served as GPT samples through the real index machinery."""
    docs = MockDocuments(vocab_size=128257, eod=128256)  # the Llama-3 script's NullTokenizer
    lengths = np.random.default_rng(0).integers(1, 4096, size=MOCK_DOCUMENTS, dtype=np.int32)
    assert np.array_equal(docs.document_lengths, lengths) and docs.num_documents == MOCK_DOCUMENTS
    for i in (0, 1, 99_999):
        expected = np.concatenate([np.arange(1, lengths[i]), [128256]])
        assert np.array_equal(docs.get_document(i), expected)
        assert np.array_equal(docs.get_document(i, 1, 2), expected[1:3])
    small = MockDocuments(vocab_size=11, eod=10)  # ids wrap below a small vocabulary, never reaching the eod
    assert set(np.concatenate([small.get_document(i)[:-1] for i in range(50)]).tolist()) == set(range(1, 10))

    train, valid, test = build_mock_datasets("'99,1,0'", (6, 2, 0), 32, 1234, str(tmp_path), 1001, 1000)
    assert test is None and len(train) >= 6 and len(valid) >= 2
    sample = train[0]["text"]
    assert sample.shape == (33,) and sample.min() >= 1 and sample.max() <= 1000
    again = build_mock_datasets("99,1,0", (6, 2, 0), 32, 1234, str(tmp_path), 1001, 1000)[0]
    assert all(np.array_equal(train[i]["text"], again[i]["text"]) for i in range(6))  # deterministic, cached
    assert list(tmp_path.glob("mock-train-*-description.json"))


def test_manual_gc_turns_the_collector_off_for_the_run_and_back_on():
    run = resolve(parse_args(SHAPE + ["--manual-gc", "--manual-gc-interval", "2"]), 1)
    housekeeping = Housekeeping(run.batch)
    assert gc.isenabled()
    housekeeping.start()
    try:
        assert not gc.isenabled()
        garbage = []
        garbage.append(garbage)  # a reference cycle only the collector frees
        del garbage
        before = gc.get_count()[0]
        housekeeping.after_step(1)  # not a multiple of the interval: nothing collected
        assert gc.get_count()[0] >= before
        housekeeping.after_step(2)
        assert gc.get_count()[0] < before
    finally:
        housekeeping.close()
    assert gc.isenabled()


def test_preprocess_with_null_tokenizer_reads_ids(tmp_path):
    """tools/preprocess_data.py --tokenizer-type NullTokenizer --vocab-size N: the text is the ids."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from megatron_snm.data import IndexedDataset

    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("3 1 4", "1 5 9 2")))
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "ids.jsonl"),
                    "--output-prefix", str(tmp_path / "ids"), "--tokenizer-type", "NullTokenizer", "--vocab-size",
                    "10", "--append-eod", "--workers", "1"], cwd=Path(__file__).resolve().parents[1], check=True,
                   capture_output=True, timeout=120)
    data = IndexedDataset(str(tmp_path / "ids_text_document"))
    assert [data.get_document(i).tolist() for i in range(2)] == [[3, 1, 4, 10], [1, 5, 9, 2, 10]]
