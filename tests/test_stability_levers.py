"""The levers against loss spikes beside the paper's fix, and the monitor signals they target.

- `--qk-layernorm` (Megatron's): with query groups and rotary positions it gives Hugging Face Qwen3's
  logits (Qwen3 is a Llama with an RMSNorm on each head's queries and keys before rotary positions).
- `--z-loss-weight` (PaLM's z-loss): equals W x mean log^2 Z computed with torch.logsumexp on the full
  logits, gradients included; the LM loss beside it is the plain cross entropy.
- `--embedding-init-method-std` (Megatron's): the token and position tables get std S, every other
  weight is unchanged (an untied output layer too, as in Megatron).
- Each lever under TP=2 and TP=2 with --sequence-parallel gives the single-process losses, gradients
  and monitor figures (one spawned 2-rank job), and the z-loss there equals torch.logsumexp's on the
  gathered logits; in training, also under PP=2 and ZeRO-3.
- The monitor's `max_attention_logit/layer_NN` and `log_z/{mean,std}` equal direct computations.
- The flags' refusals name the flag.
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_snm.config import ConfigError, parse_args, resolve
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import GPTModel
from megatron_snm.model.init import sigma
from megatron_snm.model.presets import architecture
from megatron_snm.parallel import rng as tp_random, state
from megatron_snm.parallel.mappings import all_gather_along
from megatron_snm.parallel.spawn import run_distributed
from megatron_snm.tensor_parallel.utils import gather_full, gather_full_like
from megatron_snm.training.monitor import StabilityMonitor
from tests.model_shapes import batch, relative_error, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny()
LLAMA = dict(TINY, **architecture("llama", TINY["num_attention_heads"]))  # rope, RMSNorm, SwiGLU, 2 query groups


def _perturb_norm_gains(model: GPTModel, seed: int = 3) -> None:
    """Gains away from 1 (their init), so that a norm applied after rotary positions instead of before,
    or a gain applied to the wrong head, shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=g))


# --- QK-norm -------------------------------------------------------------------------------------
def _qwen3_of(model: GPTModel, config: GPTConfig):
    """Hugging Face Qwen3 with our model's weights: QKV split group by group into q/k/v_proj, the
    q/k layernorms as q_norm/k_norm, the tied table as embed_tokens and lm_head."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads, groups, d = config.num_attention_heads, config.num_query_groups, config.head_dim
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=heads, num_key_value_heads=groups, head_dim=d,
        max_position_embeddings=config.seq_length, rms_norm_eps=config.layernorm_epsilon,
        rope_theta=config.rotary_base, tie_word_embeddings=True, attention_bias=False,
        attn_implementation="eager")).eval()
    ours = dict(model.named_parameters())
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(ours["embedding.word_embeddings.weight"])
        hf.model.norm.weight.copy_(ours["final_norm.norm.weight"])
        for n, layer in enumerate(hf.model.layers):
            p = f"layers.{n}."
            qkv = ours[p + "attention.qkv.weight"].view(groups, heads // groups + 2, d, -1)
            attention = layer.self_attn
            attention.q_proj.weight.copy_(qkv[:, :-2].reshape(heads * d, -1))
            attention.k_proj.weight.copy_(qkv[:, -2].reshape(groups * d, -1))
            attention.v_proj.weight.copy_(qkv[:, -1].reshape(groups * d, -1))
            attention.o_proj.weight.copy_(ours[p + "attention.dense.weight"])
            attention.q_norm.weight.copy_(ours[p + "attention.q_layernorm.weight"])
            attention.k_norm.weight.copy_(ours[p + "attention.k_layernorm.weight"])
            layer.input_layernorm.weight.copy_(ours[p + "ln_1.weight"])
            layer.post_attention_layernorm.weight.copy_(ours[p + "ln_2.weight"])
            layer.mlp.gate_proj.weight.copy_(ours[p + "mlp.gate.weight"])
            layer.mlp.up_proj.weight.copy_(ours[p + "mlp.fc1.weight"])
            layer.mlp.down_proj.weight.copy_(ours[p + "mlp.fc2.weight"])
    return hf


def test_qk_layernorm_with_query_groups_and_rotary_gives_qwen3_logits():
    config = GPTConfig(**dict(LLAMA, init_method="normal", init_method_std=0.2), qk_layernorm=True, embedding_norm="none")
    model = GPTModel(config).eval()
    _perturb_norm_gains(model)
    tokens = batch()[0]
    with torch.no_grad():
        ours = model(tokens)
        theirs = _qwen3_of(model, config)(tokens).logits
        # Without QK-norm the logits are another model's: the norms do act.
        plain = GPTModel(replace(config, qk_layernorm=False)).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "layernorm" not in k})
        without = plain(tokens)
    assert relative_error(ours, theirs) < 1e-5, relative_error(ours, theirs)
    assert relative_error(without, theirs) > 1e-2


def test_qk_layernorm_is_the_models_norm_over_head_channels_before_rotary():
    """LayerNorm (GPT-2) and zero-centred gains: one gain and bias per head channel, shared by the
    heads, the norm's eps; the queries and keys SDPA receives are those of the norm then the rotation."""
    config = GPTConfig(**TINY, qk_layernorm=True, apply_layernorm_1p=True, layernorm_epsilon=1e-3,
                       position_embedding_type="rope", num_query_groups=2)
    model = GPTModel(config)
    _perturb_norm_gains(model)
    attention = model.layers[0].attention
    assert attention.q_layernorm.weight.shape == attention.k_layernorm.bias.shape == (config.head_dim,)
    seen = {}
    attention.core_attention.register_forward_hook(lambda mod, inputs, out: seen.update(q=inputs[0], k=inputs[1]))
    with torch.no_grad():
        x = model.layers[0].ln_1(model.embedding(batch()[0]))
        model.layers[0](model.embedding(batch()[0]))
        b, s, _ = x.shape
        qkv = F.linear(x, attention.qkv.weight, attention.qkv.bias).view(b, s, 2, 4, config.head_dim)
        q, k = qkv[:, :, :, :2].reshape(b, s, 4, -1).transpose(1, 2), qkv[:, :, :, 2].transpose(1, 2)

        def norm(t, module):  # Megatron's --apply-layernorm-1p: the gain is stored as gamma - 1
            return F.layer_norm(t, (config.head_dim,), 1 + module.weight, module.bias, eps=1e-3)
        positions = torch.arange(s, dtype=torch.float64)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
        angles = torch.outer(positions, inv_freq).repeat(1, 2)
        cos, sin = angles.cos().float(), angles.sin().float()

        def rotate(t):
            first, second = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-second, first], dim=-1) * sin
        expected_q, expected_k = rotate(norm(q, attention.q_layernorm)), rotate(norm(k, attention.k_layernorm))
    assert relative_error(seen["q"], expected_q) < 1e-5 and relative_error(seen["k"], expected_k) < 1e-5


def test_qk_layernorm_gains_are_described_replicated_and_whole_on_every_tp_rank():
    """The description (model/describe.py, which checkpoints, resharding and the memory estimate read)
    has each block's two gains (and biases) as replicated, whole-size weights that are no matrices."""
    from megatron_snm.model.describe import describe

    config = GPTConfig(**TINY, qk_layernorm=True, tensor_parallel_size=2)
    weights = describe(config).weights
    gains = {n: w for n, w in weights.items() if "_layernorm." in n}
    assert sorted(gains) == sorted(f"layers.{n}.attention.{qk}_layernorm.{p}" for n in range(2)
                                   for qk in "qk" for p in ("weight", "bias"))
    for w in gains.values():
        assert (w.shape, w.split_dim, w.matmul, w.local_numel(2)) == ((config.head_dim,), None, False, config.head_dim)
    assert describe(replace(config, qk_layernorm=False)).weights.keys() == weights.keys() - gains.keys()


# --- z-loss --------------------------------------------------------------------------------------
def test_z_loss_equals_a_direct_computation_on_full_logits():
    weight = 1e-2
    config = GPTConfig(**TINY, z_loss_weight=weight)
    model = GPTModel(config)
    tokens, labels, mask = batch()
    logits = model(tokens).detach().requires_grad_()
    terms = model.loss(logits, labels, mask)
    (terms.lm + terms.z).backward()

    direct = logits.detach().clone().requires_grad_()
    log_z = torch.logsumexp(direct, dim=-1)
    lm = (F.cross_entropy(direct.flatten(0, 1), labels.flatten(), reduction="none") * mask.flatten()).sum() / mask.sum()
    z = weight * (log_z.square() * mask).sum() / mask.sum()
    (lm + z).backward()
    torch.testing.assert_close(terms.lm, lm, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms.z, z, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms.log_z, log_z.detach(), rtol=1e-6, atol=0)
    assert relative_error(logits.grad, direct.grad) < 1e-6
    assert terms.z > 0.01 * terms.lm  # large enough to matter in the check above
    assert GPTModel(replace(config, z_loss_weight=0.0)).loss(logits, labels, mask).z == 0


# --- --embedding-init-method-std ---------------------------------------------------------------------
@pytest.mark.parametrize("untied", [False, True])
def test_embedding_init_method_std_sets_the_embedding_tables_std_only(untied):
    base = GPTConfig(**tiny(vocab_size=2000), untie_embeddings_and_output_weights=untied)
    default, changed = GPTModel(base).state_dict(), GPTModel(replace(base, embedding_init_method_std=1.0)).state_dict()
    tables = {"embedding.word_embeddings.weight", "embedding.position_embeddings"}
    for name in tables:
        assert abs(changed[name].std().item() - 1.0) < 0.05, name
        assert abs(default[name].std().item() - sigma(base)) < 0.05 * sigma(base), name
        # the same draws, scaled: S / sigma
        torch.testing.assert_close(changed[name], default[name] * (1.0 / sigma(base)), rtol=1e-5, atol=1e-6)
    assert ("output.weight" in changed) == untied
    for name in changed.keys() - tables:
        assert torch.equal(changed[name], default[name]), name


# --- the monitor's signals ---------------------------------------------------------------------
def test_max_attention_logit_and_log_z_equal_direct_computations():
    config = GPTConfig(**dict(LLAMA, init_method="normal", init_method_std=0.3), qk_layernorm=True,
                       recompute_granularity="selective")
    model = GPTModel(config)
    _perturb_norm_gains(model)
    seen = {}
    for block in model.layers:
        block.attention.core_attention.register_forward_hook(
            lambda mod, inputs, out: seen.setdefault(mod.layer_number, []).append((inputs[0], inputs[1])))
    micro_batches = [batch(), tuple(t.flip(0) for t in batch())]
    monitor = StabilityMonitor(model)
    with monitor.capture():
        for tokens, labels, mask in micro_batches:
            terms = model.loss(model(tokens), labels, mask)
            (terms.lm + terms.z).backward()
    figures = monitor.figures()

    s = TINY["seq_length"]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for layer, captures in seen.items():
        largest = -math.inf
        for q, k in captures:  # every head against its group's key head, at the positions it attends to
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = (q @ k.transpose(-1, -2)) / math.sqrt(config.head_dim)
            largest = max(largest, logits.masked_fill(~causal, -math.inf).max().item())
        assert figures[f"max_attention_logit/layer_{layer:02d}"] == pytest.approx(largest, rel=1e-6)
    assert len([k for k in figures if k.startswith("max_attention_logit/")]) == config.num_layers

    with torch.no_grad():
        log_z = torch.cat([torch.logsumexp(model(tokens), dim=-1)[mask.bool()] for tokens, _, mask in micro_batches])
    assert figures["log_z/mean"] == pytest.approx(log_z.mean().item(), rel=1e-6)
    assert figures["log_z/std"] == pytest.approx(log_z.std().item(), rel=1e-5)


# --- refusals ----------------------------------------------------------------------------------
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
         "--train-iters", "1"]


@pytest.mark.parametrize("flags, flag", [
    (["--z-loss-weight=-1e-4"], "--z-loss-weight"),
    (["--z-loss-weight", "nan"], "--z-loss-weight"),
    (["--embedding-init-method-std", "0"], "--embedding-init-method-std"),
    (["--embedding-init-method-std=-1"], "--embedding-init-method-std"),
])
def test_bad_lever_values_are_refused_naming_the_flag(flags, flag):
    with pytest.raises(ConfigError, match=flag):
        resolve(parse_args(SHAPE + flags), 1)


def test_levers_reach_the_model_config():
    run = resolve(parse_args(SHAPE + ["--qk-layernorm", "--z-loss-weight", "1e-4", "--embedding-init-method-std",
                                      "1"]), 1)
    config = run.model_config(500)
    assert (config.qk_layernorm, config.z_loss_weight, config.embedding_init_method_std) == (True, 1e-4, 1.0)


# --- TP=2 and TP=2 with sequence parallelism against one process ------------------------------
LEVERS = {
    "qk-layernorm": dict(TINY, qk_layernorm=True),
    "qk-layernorm llama": dict(LLAMA, qk_layernorm=True),
    "qk-layernorm llama+selective": dict(LLAMA, qk_layernorm=True, recompute_granularity="selective"),
    "z-loss": dict(TINY, z_loss_weight=1e-2),
    "z-loss llama untied": dict(LLAMA, z_loss_weight=1e-2, untie_embeddings_and_output_weights=True),
    "embedding-init-method-std": dict(TINY, embedding_init_method_std=1.0, embedding_norm="scaled"),
    "all three, full recompute": dict(LLAMA, qk_layernorm=True, z_loss_weight=1e-2, embedding_init_method_std=0.5,
                                      recompute_granularity="full"),
}


def _run(config):
    """LM loss, z-loss, full weights and gradients (gathered over TP), monitor figures."""
    tp_random.model_parallel_seed(99)
    model = GPTModel(config)
    _perturb_norm_gains(model)
    tokens, labels, mask = batch()
    monitor = StabilityMonitor(model)
    with monitor.capture():
        logits = model(tokens)
        terms = model.loss(logits, labels, mask)
        (terms.lm + terms.z).backward()
    grads = {n: gather_full_like(p, p.grad) for n, p in model.named_parameters()}
    weights = {n: gather_full(p).detach() for n, p in model.named_parameters()}
    # The z-loss straight from the whole vocabulary's logits, gathered from the TP ranks' slices.
    full = all_gather_along(logits.detach(), dim=-1) if config.tensor_parallel_size > 1 else logits.detach()
    log_z = torch.logsumexp(full, dim=-1)
    direct_z = config.z_loss_weight * (log_z.square() * mask).sum() / mask.sum()
    return terms.lm.item(), (terms.z.item(), direct_z.item()), weights, grads, monitor.figures()


def _compare(run, ref):
    (lm, z, weights, grads, figures), (ref_lm, ref_z, ref_weights, ref_grads, ref_figures) = run, ref
    assert grads.keys() == ref_grads.keys() and figures.keys() == ref_figures.keys()
    # The keys' LayerNorm bias adds the same q.b to every logit of a query: softmax ignores it, so its
    # gradient is zero up to rounding, in every layout; compared as such, the others relative to themselves.
    largest = max(g.abs().max().item() for g in ref_grads.values())
    unseen = [n for n in grads if "k_layernorm.bias" in n]
    compared = [n for n in grads if n not in unseen]
    (z, direct_z), ref_z = z, ref_z[0]
    return dict(lm=abs(lm / ref_lm - 1), z=abs(z - ref_z) / max(abs(ref_z), 1e-12),
                z_direct=abs(z - direct_z) / max(abs(direct_z), 1e-12),
                weights=max(relative_error(weights[n], ref_weights[n]) for n in weights),
                grads=max(relative_error(grads[n], ref_grads[n]) for n in compared),
                worst_grad=max(compared, key=lambda n: relative_error(grads[n], ref_grads[n])),
                softmax_invariant=max([0.0] + [max(grads[n].abs().max().item(), ref_grads[n].abs().max().item())
                                               / largest for n in unseen]),
                zero_grads=[n for n in compared if not grads[n].abs().sum() > 0],
                monitor=max(abs(figures[k] - ref_figures[k]) / max(abs(ref_figures[k]), 1e-12) for k in figures),
                signals=sorted(k for k in figures if k.startswith(("max_attention_logit/", "log_z/"))))


def _tp_body(rank, world):
    torch.set_num_threads(1)
    reference = {name: _run(GPTConfig(**fields)) for name, fields in LEVERS.items()}  # TP=1: no groups yet
    state.initialize_model_parallel(world)
    results = {}
    for name, fields in LEVERS.items():
        tp = GPTConfig(**fields, tensor_parallel_size=world)
        results[f"{name} tp2"] = _compare(_run(tp), reference[name])
        results[f"{name} tp2-sp"] = _compare(_run(replace(tp, sequence_parallel=True)), reference[name])
    return results


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_tp_body, 2)


@pytest.mark.parametrize("layout", ["tp2", "tp2-sp"])
@pytest.mark.parametrize("lever", list(LEVERS))
def test_lever_under_tensor_and_sequence_parallelism_equals_one_process(tp_results, lever, layout):
    for rank, per_rank in enumerate(tp_results):
        r = per_rank[f"{lever} {layout}"]
        assert r["lm"] < 1e-5 and r["weights"] < 1e-5 and r["grads"] < 1e-5, (rank, r["worst_grad"], r)
        assert r["z"] < 1e-5 and r["z_direct"] < 1e-5 and r["softmax_invariant"] < 1e-6, (rank, r)
        assert r["monitor"] < 1e-5, (rank, r)
        assert not r["zero_grads"], (rank, r["zero_grads"])
        assert {"log_z/mean", "log_z/std", "max_attention_logit/layer_01", "max_attention_logit/layer_02"} \
            == set(r["signals"]), r["signals"]


# --- training: every layout, the loss line stays the LM loss ------------------------------------------
def test_training_with_the_levers_matches_one_process_in_every_layout(tmp_path):
    """The three levers together train with the same LM losses, z-losses and monitor signals under
    PP=2 (the loss on the last stage) and TP=2 with sequence parallelism as in one process (and the same
    losses under DP=2 with ZeRO-3, the loss module partitioned with the model); the z-loss
    is reported apart (TensorBoard `z-loss/z-loss`, read back by analysis/run_history.py), and the
    LM loss beside it is the cross entropy alone: with the z-loss on, the first step's loss is that of
    the run without it, and the later ones differ (its gradient was trained on)."""
    from megatron_snm.analysis.run_history import RunHistory
    from tests.training_harness import TINY as HARNESS, run_configs

    levers = ["--qk-layernorm", "--z-loss-weight", "1e-2", "--embedding-init-method-std", "0.5"]

    def logged(name):
        return ["--log-stability-interval", "5", "--tensorboard-dir", str(tmp_path / name)]
    one = dict(zip(("levers", "z-loss only", "plain"), run_configs(1, [
        HARNESS + levers + logged("levers"), HARNESS + ["--z-loss-weight", "0.1"], HARNESS])))
    two = dict(zip(("pp2", "tp2-sp", "dp2-zero3"), run_configs(2, [
        HARNESS + levers + ["--pipeline-model-parallel-size", "2"] + logged("pp2"),
        HARNESS + levers + ["--tensor-model-parallel-size", "2", "--sequence-parallel"] + logged("tp2-sp"),
        HARNESS + levers + ["--zero-stage", "3"]])))

    reference = one["levers"]
    assert sorted(reference.z_losses) == list(range(1, 11)) and all(z > 0 for z in reference.z_losses.values())
    assert not one["plain"].z_losses
    history = RunHistory.read("/dev/null", str(tmp_path / "levers"))
    assert history.z_loss == pytest.approx(reference.z_losses, rel=1e-6)
    signals = {"log_z/mean", "log_z/std", *(f"max_attention_logit/layer_{n:02d}" for n in range(1, 5))}
    assert sorted(history.stability) == [5, 10] and signals <= history.stability[5].keys()
    for layout, run in two.items():
        assert not isinstance(run, Exception), run
        assert run.losses == pytest.approx(reference.losses, rel=1e-5), layout
        assert run.z_losses == pytest.approx(reference.z_losses, rel=1e-5), layout
        assert run.valid_losses == pytest.approx(reference.valid_losses, rel=1e-5), layout
        if layout == "dp2-zero3":  # each data-parallel rank's monitor sees its own micro-batches
            continue
        figures = RunHistory.read("/dev/null", str(tmp_path / layout)).stability
        for step in (5, 10):
            for name in signals:
                assert figures[step][name] == pytest.approx(history.stability[step][name], rel=1e-4), (layout, name)

    z_only, plain = one["z-loss only"].losses, one["plain"].losses
    assert z_only[1] == pytest.approx(plain[1], rel=1e-6)
    assert abs(z_only[10] / plain[10] - 1) > 1e-3, (z_only[10], plain[10])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memory_estimate_counts_qk_layernorm(arch):
    """QK-norm's gains are in the description (so in the parameter counts), and the activations it adds
    (the norms' inputs and statistics, their outputs without rotary, SDPA's output) are what autograd keeps."""
    from megatron_snm.analysis.memory_measure import SavedActivations
    from megatron_snm.model.presets import architecture_flags
    from megatron_snm.model.transformer import run_blocks
    from megatron_snm.training import memory_estimate

    shape = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "8", "--seq-length", "128",
             "--train-iters", "1", "--micro-batch-size", "2", *architecture_flags(arch, 8)]
    tokens = torch.randint(0, 500, (2, 128), generator=torch.Generator().manual_seed(0))
    saved, estimated, parameters = [], [], []
    for qk in ([], ["--qk-layernorm"]):
        run = resolve(parse_args(shape + qk), 1)
        model = GPTModel(run.model_config(500))
        with SavedActivations(model) as activations:
            model.embedding.logits(model.final_norm(run_blocks(model.layers, model.embedding(tokens), 1)))
        plan = memory_estimate.plan_from_config(run, 500, run.deepspeed)
        saved.append(activations.bytes)
        estimated.append(memory_estimate.stage_activation_bytes(plan, 0)["activations"])
        parameters.append(memory_estimate.estimate_stage(plan, 0).parameters)
    assert parameters[1] - parameters[0] == 2 * 2 * (2 if arch == "gpt2" else 1) * 16  # q, k: gain (+ bias) of 16
    assert estimated[1] - estimated[0] == pytest.approx(saved[1] - saved[0], rel=0.05)


def test_log_line_gives_the_z_loss_apart_from_the_lm_loss(capsys):
    """` z loss: ... |` follows `lm loss`, the interval's means of each; the parsers of the lm loss
    (Megatron's line, analysis/run_history.py) read the line as before."""
    import re

    from megatron_snm.analysis.run_history import _ITERATION
    from megatron_snm.training.callbacks import StepReport
    from megatron_snm.training.engine import StepResult
    from megatron_snm.training.metrics import TrainingMetrics
    from megatron_snm.training.spikes import Verdict

    run = resolve(parse_args(SHAPE + ["--train-iters", "2", "--log-interval", "2", "--z-loss-weight", "1e-4"]), 1)
    metrics = TrainingMetrics(run, 1.0, rank=0)
    for it, (lm, z) in enumerate([(4.0, 0.25), (3.0, 0.5)], start=1):
        metrics.post_step(StepReport(it, it, 1e-4, StepResult(lm, 1.0, True, True, z_loss=z),
                                     Verdict(False, False, False), 1.0, 0, 0, 0, None, step_time=1.0))
    line = capsys.readouterr().out
    assert re.search(r" lm loss: (\S+) \| z loss: (\S+) \|", line).groups() == ("3.500000E+00", "3.750000E-01")
    assert _ITERATION.search(line) and re.search(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: (\S+) \|", line)


def test_hugging_face_export_refuses_qk_layernorm_naming_it():
    """Neither GPT-2's nor Llama's classes have QK-norm: the export says so rather than dropping the gains."""
    from megatron_snm.hf.export import hf_family

    assert hf_family(GPTConfig(**TINY, z_loss_weight=1e-4, embedding_init_method_std=1.0)) == "gpt2"  # nothing to hold
    assert hf_family(GPTConfig(**LLAMA, z_loss_weight=1e-4)) == "llama"
    for shape in (TINY, LLAMA):
        with pytest.raises(ValueError, match="--qk-layernorm"):
            hf_family(GPTConfig(**shape, qk_layernorm=True))
