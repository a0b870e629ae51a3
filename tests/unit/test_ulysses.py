"""Ulysses sequence parallelism on 2 and 4 gloo ranks equals the single-device module and sends what the formula says.

Outputs and gradients (inputs and every weight) to 1e-5 in float32: self- and cross-attention,
padding masks, causal masks as a tensor and as `is_causal`, per-head masks, lengths that R does not
divide, the three layouts. One launch per rank count runs every case. Bad input (heads that R does
not divide, the options of notebook 12) is refused by name before any message.
"""

from __future__ import annotations

import pytest
import torch
from parallel_launch_targets import all_to_all_pieces

from course_lib import MultiHeadAttention
from course_lib.parallel import ring_attention as ra
from course_lib.parallel import ulysses as ul
from course_lib.parallel.distributed import Comm, launch, run_many

TOL = 1e-5

CASES = [
    {"B": 2, "T": 8, "d_model": 16, "heads": 4, "mask": ""},
    {"B": 2, "T": 8, "d_model": 16, "heads": 4, "mask": "is_causal"},
    {"B": 2, "T": 9, "d_model": 16, "heads": 4, "mask": "padding causal"},
    {"B": 2, "T": 9, "d_model": 16, "heads": 4, "mask": "padding is_causal", "layout": "zigzag"},
    {"B": 1, "T": 7, "d_model": 16, "heads": 4, "mask": "causal", "layout": "striped"},
    {"B": 2, "T": 6, "S": 11, "d_model": 16, "heads": 4, "cross": True, "mask": "padding"},
]


@pytest.fixture(scope="module", params=[2, 4], ids=["R=2", "R=4"])
def launched(request):
    R = request.param
    calls = [(ul.compare_case, {"case": c}) for c in CASES] + [(all_to_all_pieces, {})]
    return R, launch(run_many, R, (calls,), timeout=120)  # [rank][call]


def test_ulysses_equals_the_single_module(launched):
    R, per_rank = launched
    for rank, results in enumerate(per_rank):
        for result in results[: len(CASES)]:
            bad = {k: v for k, v in result["errors"].items() if not v < TOL}  # NaN fails too
            assert not bad, f"R={R} rank {rank}, case {result['case']}: errors above {TOL}: {bad}"


def test_ulysses_sends_the_bytes_of_the_formula_on_every_rank(launched):
    R, per_rank = launched
    for rank, results in enumerate(per_rank):
        for result in results[: len(CASES)]:
            assert (result["sent forward"], result["sent backward"]) == \
                (result["expected forward"], result["expected backward"]), (R, rank, result["case"])


def test_all_to_all_delivers_piece_j_of_rank_i_to_rank_j(launched):
    R, per_rank = launched
    for j, result in enumerate(per_rank):
        got = result[-1]
        for i in range(R):
            torch.testing.assert_close(got["received"][i], torch.full((i + 1, 3), 10.0 * i + j))
        assert got["sent"] == (R - 1) * (j + 1) * 3 * 4  # every piece but its own, float32


@pytest.mark.parametrize("R", [2, 4, 8])
@pytest.mark.parametrize("T", [64, 1024])
def test_closed_forms_when_R_divides_T(R, T):
    B, D, e = 2, 64, 2
    layout = ra.SequenceLayout.make(T, R)
    for rank in range(R):
        ulysses = ul.ulysses_bytes_per_step(layout, layout, rank, B, D, e)
        ring = ra.ring_bytes_per_step(layout, rank, B, D, e)
        assert ulysses["forward"] == ulysses["backward"] == 4 * (R - 1) * B * T * D * e // R**2
        assert ring["forward"] + ring["backward"] == (6 * (R - 1) + 2) * B * (T // R) * D * e
        assert ring["forward"] + ring["backward"] > ulysses["forward"] + ulysses["backward"]


def _ranks(R: int, rank: int = 0) -> Comm:
    """A Comm that says it is rank `rank` of R and has no group: any message would fail."""
    return type("FakeRanks", (Comm,), {"world_size": R, "rank": rank})()


def test_heads_that_R_does_not_divide_are_refused_by_name():
    with pytest.raises(ValueError, match="num_heads=6 must be divisible by the number of ranks R=4"):
        ul.UlyssesAttention(MultiHeadAttention(12, 6), _ranks(4))
    ul.UlyssesAttention(MultiHeadAttention(12, 6), _ranks(3))  # 6 / 3 whole heads: fine


def test_bad_input_is_refused_before_any_message():
    torch.manual_seed(0)
    comm = _ranks(2)
    layout = ra.SequenceLayout.make(6, 2)
    module = ul.UlyssesAttention(MultiHeadAttention(16, 4), comm)
    with pytest.raises(ValueError, match="query must be this rank's shard"):
        module(torch.randn(1, 4, 16), q_layout=layout)
    with pytest.raises(TypeError, match="q_layout must be a SequenceLayout"):
        module(torch.randn(1, 3, 16), q_layout=None)
    with pytest.raises(ValueError, match="is_causal=True with T=6 queries and S=4 keys"):
        module(torch.randn(1, 3, 16), torch.randn(1, 2, 16), q_layout=layout,
               kv_layout=ra.SequenceLayout.make(4, 2), is_causal=True)
    module.attn.dropout = 0.1
    with pytest.raises(ValueError, match="not supported by Ulysses sequence parallelism"):
        module.train()(torch.randn(1, 3, 16), q_layout=layout)
    assert comm.sent == 0 and comm.log == []


@pytest.mark.parametrize("options", [{"num_kv_heads": 2}, {"rotary": True}])
def test_notebook_12_options_are_refused_not_split_wrongly(options):
    from course_lib.positional import RotaryEmbedding

    options = {"rotary": RotaryEmbedding(4)} if "rotary" in options else options
    with pytest.raises(ValueError, match="Ulysses sequence parallelism splits plain multi-head attention only"):
        ul.UlyssesAttention.from_module(MultiHeadAttention(16, 4, **options), _ranks(2))


def test_the_all_to_alls_invert_each_other_at_one_rank():
    """At R = 1 both all-to-alls are the identity (no message), so Ulysses is the module itself."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4)
    x = torch.randn(2, 5, 16)
    layout = ra.SequenceLayout.make(5, 1)
    out = ul.UlyssesAttention.from_module(mha, _ranks(1))(x, q_layout=layout, is_causal=True)
    torch.testing.assert_close(out, mha(x, is_causal=True), atol=TOL, rtol=0)




def test_the_all_to_alls_refuse_shards_of_the_wrong_shape_before_any_message():
    comm = _ranks(2)
    layout = ra.SequenceLayout.make(6, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, B, heads, 3, d\)"):
        ul.sequence_to_heads(torch.zeros(1, 2, 4, 4, 8), comm, layout)
    with pytest.raises(ValueError, match="x has 3 heads"):
        ul.sequence_to_heads(torch.zeros(1, 2, 3, 3, 8), comm, layout)
    with pytest.raises(ValueError, match=r"y must have shape \(N, B, heads, 6, d\)"):
        ul.heads_to_sequence(torch.zeros(1, 2, 2, 3, 8), comm, layout)
    with pytest.raises(ValueError, match="layout is for 4 ranks"):
        ul.heads_to_sequence(torch.zeros(1, 2, 2, 6, 8), comm, ra.SequenceLayout.make(6, 4))
    with pytest.raises(TypeError, match="layout must be a SequenceLayout"):
        ul.sequence_to_heads(torch.zeros(1, 2, 4, 3, 8), comm, None)
    assert comm.sent == 0
