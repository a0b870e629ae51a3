"""Tasks, the head-gated model, Michel et al.'s head importance, pruning, the low-rank bound, the sweep script."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import MultiHeadAttention
from course_lib.experiments.head_ablation import (
    DATA_SEED_OFFSET,
    TASKS,
    HeadGatedTransformer,
    MeanPoolClassifier,
    TrainConfig,
    batch_gradient_importance,
    eval_batch,
    evaluate,
    gate_gradients,
    head_importance,
    held_out_test_batch,
    importance_order,
    load_head_model,
    make_batch,
    parameter_gradient_importance,
    parity_batches,
    pruning_curve,
    save_head_model,
    single_removal,
    train_model,
    train_parity,
)
from course_lib.experiments.lowrank import fit_attention_pattern, score_matrix_rank
from course_lib.experiments.training import CheckpointError, save_checkpoint


def small_model(num_heads=4, num_layers=2, seed=0, task="two_lookups"):
    torch.manual_seed(seed)
    return HeadGatedTransformer.for_task(TASKS[task], d_model=16, num_heads=num_heads, num_layers=num_layers,
                                         d_ff=32).double().eval()


def test_labels_are_the_tokens_at_the_offsets():
    task = TASKS["three_lookups"]
    x, y = make_batch(task, 3, torch.Generator().manual_seed(0))
    for b in range(3):
        for t in range(task.seq_len):
            digits = [int(x[b, (t - o) % task.seq_len]) for o in task.offsets]
            assert int(y[b, t]) == (digits[0] * task.vocab + digits[1]) * task.vocab + digits[2]
    assert int(y.max()) < task.num_classes


def test_model_matches_course_mha_when_ungated():
    """The gated attention is course_lib.MultiHeadAttention's computation when every gate is 1."""
    model = small_model(num_layers=1)
    attn = model.layers[0].attn
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    ours, weights = attn(x, torch.ones(4, dtype=torch.float64))
    ref, ref_weights = attn.mha(x, need_weights=True)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(weights, ref_weights)
    assert isinstance(attn.mha, MultiHeadAttention)


def test_keeping_all_heads_equals_the_unpruned_model():
    model = small_model()
    x, y = make_batch(TASKS["two_lookups"], 8, torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x, head_gate=torch.ones(2, 4, dtype=torch.float64)), model(x))
    curve = pruning_curve(model, x, y, [])
    assert curve == [evaluate(model, x, y)[1]]


def test_a_zero_gate_removes_exactly_that_head():
    model = small_model(num_layers=1)
    attn = model.layers[0].attn
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    gate = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    out, _ = attn(x, gate)
    W = attn.mha.out_proj.weight  # (D, D): columns 4..7 read head 1
    with torch.no_grad():
        W_without = W.clone()
        W_without[:, 4:8] = 0
        attn.mha.out_proj.weight.copy_(W_without)
    ref, _ = attn(x)
    torch.testing.assert_close(out, ref)


def test_head_gate_gradient_matches_finite_differences():
    model = small_model()
    x, y = make_batch(TASKS["two_lookups"], 8, torch.Generator().manual_seed(2))
    mask = torch.ones(2, 4, dtype=torch.float64)
    mask[1, 2] = 0.3  # away from the all-ones point too

    def loss(m):
        return F.cross_entropy(model(x, head_gate=m).flatten(0, 1), y.flatten())

    gate = mask.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(gate), gate)
    eps = 1e-6
    for layer in range(2):
        for head in range(4):
            e = torch.zeros_like(mask)
            e[layer, head] = eps
            fd = (loss(mask + e) - loss(mask - e)) / (2 * eps)
            assert abs(fd.item() - grad[layer, head].item()) < 1e-7
    torch.testing.assert_close(batch_gradient_importance(model, x, y, mask), grad.abs())


def _loop_gate_gradients(model, x, y, gate):
    """Reference: one example at a time, one backward pass each."""
    out = []
    for b in range(x.shape[0]):
        g = gate.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x[b : b + 1], head_gate=g).flatten(0, 1), y[b])
        out.append(torch.autograd.grad(loss, g)[0])
    return torch.stack(out)  # (B, L, H)


def test_per_example_gate_gradients_equal_one_example_at_a_time():
    model = small_model()
    x, y = make_batch(TASKS["two_lookups"], 6, torch.Generator().manual_seed(4))
    gate = torch.ones(2, 4, dtype=torch.float64)
    gate[0, 1] = 0.0  # a removed head still gets a gradient (how much putting it back would change the loss)
    per_example = gate_gradients(model, x, y, gate)
    assert per_example.shape == (6, 2, 4)
    torch.testing.assert_close(per_example, _loop_gate_gradients(model, x, y, gate))
    # Michel et al.: mean of |per-example gradient|; the batch-mean variant: |mean gradient|
    torch.testing.assert_close(head_importance(model, x, y, gate), per_example.abs().mean(0))
    torch.testing.assert_close(batch_gradient_importance(model, x, y, gate), per_example.mean(0).abs())


def test_michel_importance_bounds_the_batch_score_and_equals_it_for_one_example():
    model = small_model()
    x, y = make_batch(TASKS["two_lookups"], 16, torch.Generator().manual_seed(5))
    michel, batch = head_importance(model, x, y), batch_gradient_importance(model, x, y)
    assert bool((michel >= batch - 1e-12).all()) and bool((michel > batch + 1e-9).any())  # cancellation happens
    torch.testing.assert_close(head_importance(model, x[:1], y[:1]), batch_gradient_importance(model, x[:1], y[:1]))


def test_per_example_gates_are_validated_and_leave_the_model_unchanged():
    model = small_model()
    x, y = make_batch(TASKS["two_lookups"], 3, torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="head_gate must have shape"):
        model(x, head_gate=torch.ones(4, 2, 4, dtype=torch.float64))  # B = 4 for 3 sequences
    with pytest.raises(ValueError, match="x and y"):
        gate_gradients(model, x, y[:, :3])
    model.train()
    gate_gradients(model, x, y)
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())  # no gradient left on the weights


def test_parameter_gradient_importance_partitions_the_attention_gradient():
    model = small_model()
    x, y = make_batch(TASKS["two_lookups"], 8, torch.Generator().manual_seed(7))
    imp = parameter_gradient_importance(model, x, y)
    assert imp.shape == (2, 4) and bool((imp > 0).all())
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    for i, layer in enumerate(model.layers):
        m = layer.attn.mha
        params = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.out_proj.weight,
                  m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]
        total = sum(float((g**2).sum()) for g in torch.autograd.grad(loss, params, retain_graph=True))
        # the heads own disjoint slices that cover all of these (W_O's bias belongs to no head)
        assert math.isclose(float((imp[i] ** 2).sum()), total, rel_tol=1e-9)


def test_single_removal_finds_a_head_that_does_nothing():
    model = small_model(num_layers=1)
    with torch.no_grad():
        model.layers[0].attn.mha.out_proj.weight[:, 8:12] = 0  # head 2 (d_head 4) writes nothing
    x, y = make_batch(TASKS["two_lookups"], 8, torch.Generator().manual_seed(8))
    full_loss, full_acc, losses, accs = single_removal(model, x, y)
    assert (full_loss, full_acc) == evaluate(model, x, y)
    assert math.isclose(float(losses[0, 2]), full_loss, rel_tol=1e-12) and float(accs[0, 2]) == full_acc
    assert all(not math.isclose(float(losses[0, h]), full_loss, rel_tol=1e-9) for h in (0, 1, 3))
    gate = torch.ones(1, 4, dtype=torch.float64)
    gate[0, 1] = 0
    assert math.isclose(float(losses[0, 1]), evaluate(model, x, y, gate)[0])


def test_importance_order_and_bad_mask():
    assert importance_order(torch.tensor([[3.0, 1.0], [2.0, 0.5]])) == [(1, 1), (0, 1), (1, 0), (0, 0)]
    model = small_model()
    with pytest.raises(ValueError, match="head_gate must have shape"):
        model(torch.zeros(1, 4, dtype=torch.long), head_gate=torch.ones(4))


def test_pruning_every_head_leaves_no_attention():
    model = small_model(num_layers=1)
    x, y = make_batch(TASKS["two_lookups"], 4, torch.Generator().manual_seed(3))
    order = [(0, h) for h in range(4)]
    curve = pruning_curve(model, x, y, order)
    assert len(curve) == 5
    # with every head gated off, the output no longer depends on the other positions' tokens
    x2 = x.clone()
    x2[:, 1:] = (x2[:, 1:] + 1) % TASKS["two_lookups"].vocab
    off = torch.zeros(1, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x, head_gate=off)[:, 0], model(x2, head_gate=off)[:, 0])


@pytest.mark.parametrize("d_head", [1, 2, 4, 8])
def test_score_matrix_rank_is_at_most_d_head(d_head):
    g = torch.Generator().manual_seed(d_head)
    x = torch.randn(20, 32, generator=g, dtype=torch.float64)
    w_q, w_k = (torch.randn(32, d_head, generator=g, dtype=torch.float64) for _ in range(2))
    assert score_matrix_rank(x, w_q, w_k) == d_head


def test_fitting_a_permutation_pattern_needs_more_than_one_dimension():
    g = torch.Generator().manual_seed(0)
    T = 8
    x = torch.randn(T, 16, generator=g)
    target = torch.eye(T)[torch.randperm(T, generator=g)] * 0.9 + 0.1 / T  # a random one-to-one pattern
    kl_small = fit_attention_pattern(target, x, d_head=1, steps=200)
    kl_large = fit_attention_pattern(target, x, d_head=8, steps=200)
    assert kl_large < 0.5 * kl_small
    with pytest.raises(ValueError, match="target must have shape"):
        fit_attention_pattern(torch.eye(3), x, d_head=2)


def test_sweep_script_runs_on_a_tiny_configuration(tmp_path):
    import importlib.util

    from course_lib.tools.paths import REPO_ROOT
    spec = importlib.util.spec_from_file_location("run_head_ablation", REPO_ROOT / "scripts" / "run_head_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.main(["--tiny", "--out", str(tmp_path)])
    record = json.loads(path.read_text())
    assert [r["config"]["num_heads"] for r in record["runs"]] == [1, 2]
    assert len({r["params"] for r in record["runs"]}) == 1  # same parameter count for every head count
    assert all(math.isfinite(r["final_loss"]) and 0 <= r["final_acc"] <= 1 for r in record["runs"])
    assert record["command"].startswith("python scripts/run_head_ablation.py --tiny")
    model, info = load_head_model(tmp_path / "heads_two_lookups_attn_mlp_h2.safetensors")
    assert (model.num_heads, model.config["d_model"], model.config["d_ff"]) == (2, 32, 128)
    assert info["metadata"]["task"] == "two_lookups" and info["metadata"]["variant"] == "attn_mlp"


@pytest.mark.parametrize("name", ["heads_two_lookups_attn_only_h8", "heads_three_lookups_attn_mlp_h8"])
def test_recorded_head_checkpoints_load_with_their_config(name):
    from course_lib.tools.paths import PACKAGE_DATA

    model, info = load_head_model(PACKAGE_DATA / "checkpoints" / f"{name}.safetensors")
    assert model.num_heads == 8 and not model.training
    task = TASKS[info["metadata"]["task"]]
    x, y = make_batch(task, 256, torch.Generator().manual_seed(0))
    assert evaluate(model, x, y)[1] > 0.9  # the trained H = 8 models solve their task


def test_head_model_checkpoint_round_trip_and_a_foreign_checkpoint(tmp_path):
    model = small_model()
    path = save_head_model(tmp_path / "m.safetensors", model, metadata={"note": "x"})
    loaded, info = load_head_model(path)
    x, _ = make_batch(TASKS["two_lookups"], 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.double()(x), model(x))
    assert info["metadata"] == {"note": "x"}
    other = save_checkpoint(tmp_path / "other.safetensors", torch.nn.Linear(2, 2), config={"in_features": 2})
    with pytest.raises(CheckpointError, match="not a HeadGatedTransformer"):
        load_head_model(other)


def test_train_model_uses_the_shared_loop_and_is_reproducible():
    cfg = TrainConfig(task="two_lookups", num_heads=2, d_model=16, d_ff=32, steps=12, eval_every=4)
    (m1, c1), (m2, c2) = train_model(cfg), train_model(cfg)
    assert c1 == c2 and c1["step"] == [4, 8, 12]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))


def test_training_stops_at_the_target_accuracy_on_the_full_runs_path():
    cfg = TrainConfig(task="one_lookup", num_heads=2, d_model=16, d_ff=32, steps=120, eval_every=10, lr=1e-2)
    _, full = train_model(cfg)
    target = full["eval_acc"][5] - 1e-9  # reached at step 60 at the latest
    cut = next(i for i, a in enumerate(full["eval_acc"]) if a >= target)
    model, stopped = train_model(TrainConfig(**{**cfg.__dict__, "stop_at_acc": target}))
    assert stopped["steps_to_target"] == full["step"][cut] and not model.training
    assert stopped["eval_acc"] == full["eval_acc"][: cut + 1]  # the same schedule: the same path up to the stop
    _, never = train_model(TrainConfig(**{**cfg.__dict__, "steps": 20, "stop_at_acc": 1.0}))
    assert never["steps_to_target"] is None and never["step"] == [10, 20]
    with pytest.raises(ValueError, match="stop_at_acc"):
        train_model(TrainConfig(steps=4, stop_at_acc=1.5))


def test_the_seeds_parity_ablation_model_and_data():
    x, y = parity_batches(2, 5, 7, 11, torch.Generator().manual_seed(0))[1]
    assert x.shape == (5, 7) and torch.equal(y, x.sum(1) % 2)
    model = MeanPoolClassifier(11, 8, num_heads=2)
    assert model(x).shape == (5, 2)
    with pytest.raises(ValueError, match="num_batches"):
        parity_batches(0, 5, 7, 11, torch.Generator())
    result = train_parity(2, d_model=8, vocab=20, seq_len=6, batch_size=4, train_batches=3, test_batches=2, epochs=2)
    assert len(result["epoch_loss"]) == 2 and all(0 <= result[k] <= 1 for k in ("train_acc", "test_acc"))


def test_train_model_refuses_a_zero_warm_up():
    with pytest.raises(ValueError, match="warmup_steps"):
        train_model(TrainConfig(steps=4, warmup_steps=0))


def _script(name):
    import importlib.util

    from course_lib.tools.paths import REPO_ROOT
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_script_arms_record_learning_rates_and_steps_to_target(tmp_path):
    path = _script("run_head_ablation").main(["--tiny", "--out", str(tmp_path), "--lrs", "0.001", "0.01",
                                              "--stop-at-acc", "0.9", "--name", "arm", "--no-checkpoints"])
    record = json.loads(path.read_text())
    assert path.name == "arm.json" and record["complete"] and record["stop_at_acc"] == 0.9
    assert [(r["config"]["num_heads"], r["config"]["lr"]) for r in record["runs"]] == [
        (1, 0.001), (1, 0.01), (2, 0.001), (2, 0.01)]
    assert all("steps_to_target" in r["curve"] for r in record["runs"])
    assert not list(tmp_path.glob("*.safetensors"))


def test_parity_script_runs_on_a_tiny_configuration(tmp_path):
    path = _script("run_parity_ablation").main(["--tiny", "--out", str(tmp_path)])
    record = json.loads(path.read_text())
    assert [(r["num_heads"], r["seed"]) for r in record["runs"]] == [(1, 0), (2, 0)]
    assert record["command"].startswith("python scripts/run_parity_ablation.py --tiny")
    assert all(0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 for r in record["runs"])


def _sequences(x):
    return {tuple(row) for row in x.tolist()}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_test_batch_shares_no_sequence_with_the_validation_or_the_training_batches(task):
    test = _sequences(held_out_test_batch(TASKS[task])[0])
    assert len(test) == 2048 and not test & _sequences(eval_batch(TASKS[task])[0])
    assert _sequences(held_out_test_batch(TASKS[task], 8)[0]) <= test  # a smaller test batch is its first rows
    for seed in range(5):  # the training batches of the recorded learning-rate sweep: seeds 0-4, 500 steps of 64
        generator = torch.Generator().manual_seed(seed + DATA_SEED_OFFSET)
        training = set().union(*(_sequences(make_batch(TASKS[task], 64, generator)[0]) for _ in range(500)))
        assert not test & training, (task, seed)
    # the check can fail: a batch drawn from the validation generator is the validation batch
    assert _sequences(make_batch(TASKS[task], 512, torch.Generator().manual_seed(12345))[0]) == _sequences(
        eval_batch(TASKS[task])[0])
    with pytest.raises(ValueError, match="size"):
        held_out_test_batch(TASKS[task], 0)


def test_sweep_script_scores_each_final_model_on_the_test_batch(tmp_path):
    path = _script("run_head_ablation").main(["--tiny", "--out", str(tmp_path), "--test-size", "64"])
    record = json.loads(path.read_text())
    assert record["test"]["size"] == 64 and record["test"]["seed"] != record["validation"]["seed"]
    for r in record["runs"]:
        assert (r["val_acc"], r["val_loss"]) == (r["curve"]["eval_acc"][-1], r["curve"]["eval_loss"][-1])
        assert 0 <= r["test_acc"] <= 1 and math.isfinite(r["test_loss"])
    model, _ = load_head_model(tmp_path / "heads_two_lookups_attn_mlp_h2.safetensors")  # the H = 2 run, saved
    h2 = record["runs"][-1]
    test_loss, test_acc = evaluate(model, *held_out_test_batch(TASKS["two_lookups"], 64))
    assert (test_acc, test_loss) == pytest.approx((h2["test_acc"], h2["test_loss"]), abs=1e-6)
    val_loss, _ = evaluate(model, *eval_batch(TASKS["two_lookups"], 512))
    assert val_loss == pytest.approx(h2["val_loss"], abs=1e-6) and test_loss != pytest.approx(val_loss, abs=1e-6)


def test_sweep_script_refuses_an_empty_test_batch(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script("run_head_ablation").main(["--tiny", "--out", str(tmp_path), "--test-size", "0"])
    assert exit_info.value.code == 2 and "--test-size" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
