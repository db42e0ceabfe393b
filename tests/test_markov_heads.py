"""The Markov heads (markov.py) and the shared sampling filter (sampling.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.markov import (
    MARKOV_HEAD_TYPES,
    GatedMarkovHead,
    MarkovHead,
    RnnMarkovHead,
    VanillaMarkovHead,
    build_markov_head,
)
from dspark_core.modeling.sampling import filtered_probs

V, H, R, B = 40, 16, 8, 5
LEAD = (2, 3)


def make_head(head_type: str, seed: int = 0) -> MarkovHead:
    torch.manual_seed(seed)
    return build_markov_head(head_type, V, H, R)


def block_inputs(seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*LEAD, B, H, generator=gen)
    prev = torch.randint(0, V, (*LEAD, B), generator=gen)
    return hidden, prev


def step_through(head: MarkovHead, hidden: Tensor, prev: Tensor, *, reset: bool = False) -> Tensor:
    state = head.initial_state(prev.shape[:-1], hidden.device, hidden.dtype)
    latents = []
    for k in range(hidden.shape[-2]):
        if reset:
            state = head.initial_state(prev.shape[:-1], hidden.device, hidden.dtype)
        m_k, state = head.latent_step(hidden[..., k, :], prev[..., k], state)
        latents.append(m_k)
    return torch.stack(latents, dim=-2)


# --- construction and state dict ------------------------------------------------------------------


def test_head_types_constant_and_classes() -> None:
    assert MARKOV_HEAD_TYPES == ("vanilla", "gated", "rnn")
    expected = {"vanilla": VanillaMarkovHead, "gated": GatedMarkovHead, "rnn": RnnMarkovHead}
    for head_type in MARKOV_HEAD_TYPES:
        head = build_markov_head(head_type, V, H, R)
        assert type(head) is expected[head_type]
        assert head.head_type == head_type


@pytest.mark.parametrize(
    ("head_type", "extra"),
    [
        ("vanilla", {}),
        ("gated", {"gate_proj.weight": (R, H + R), "gate_proj.bias": (R,)}),
        ("rnn", {"joint_proj.weight": (3 * R, 2 * R + H), "joint_proj.bias": (3 * R,)}),
    ],
)
def test_state_dict_keys_and_shapes(head_type: str, extra: dict[str, tuple[int, ...]]) -> None:
    holder = nn.Module()
    holder.markov_head = build_markov_head(head_type, V, H, R)
    expected = {
        "markov_head.markov_w1.weight": (V, R),
        "markov_head.markov_w2.weight": (V, R),
        **{f"markov_head.{key}": shape for key, shape in extra.items()},
    }
    got = {key: tuple(value.shape) for key, value in holder.state_dict().items()}
    assert got == expected


def test_unknown_head_type_error_names_field_value_and_choices() -> None:
    with pytest.raises(DraftConfigError) as info:
        build_markov_head("lstm", V, H, R)
    message = str(info.value)
    for fragment in ("markov_head_type", "'lstm'", "'vanilla'", "'gated'", "'rnn'"):
        assert fragment in message


@pytest.mark.parametrize("rank", [0, -3])
def test_bad_rank_error_names_markov_rank(rank: int) -> None:
    with pytest.raises(DraftConfigError, match="markov_rank"):
        build_markov_head("vanilla", V, H, rank)


def test_initial_state() -> None:
    assert make_head("vanilla").initial_state((2, 3), "cpu", torch.float32) is None
    assert make_head("gated").initial_state((2, 3), "cpu", torch.float32) is None
    state = make_head("rnn").initial_state((2, 3), "cpu", torch.float64)
    assert state is not None
    assert state.shape == (2, 3, R)
    assert state.dtype == torch.float64
    assert not state.any()


# --- the formulas of the method reference ----------------------------------------------------------


def test_vanilla_latent_is_the_embedding() -> None:
    head = make_head("vanilla")
    hidden, prev = block_inputs()
    torch.testing.assert_close(head.latent_block(hidden, prev), head.markov_w1.weight[prev])
    torch.testing.assert_close(
        head.correction(head.embed_previous(prev)), head.markov_w1.weight[prev] @ head.markov_w2.weight.T
    )


def test_gated_formula_with_input_order_h_then_embedding() -> None:
    head = make_head("gated")
    assert isinstance(head, GatedMarkovHead)
    hidden, prev = block_inputs()
    emb = head.markov_w1.weight[prev]
    weight, bias = head.gate_proj.weight, head.gate_proj.bias
    gate = torch.sigmoid(hidden @ weight[:, :H].T + emb @ weight[:, H:].T + bias)
    torch.testing.assert_close(head.latent_block(hidden, prev), gate * emb)


def test_rnn_formula_with_input_order_state_embedding_h_and_split_g_c_o() -> None:
    head = make_head("rnn")
    assert isinstance(head, RnnMarkovHead)
    hidden, prev = block_inputs()
    weight, bias = head.joint_proj.weight, head.joint_proj.bias
    w_s, w_e, w_h = weight[:, :R], weight[:, R : 2 * R], weight[:, 2 * R :]
    state = torch.zeros(*LEAD, R)
    expected = []
    for k in range(B):
        emb = head.markov_w1.weight[prev[..., k]]
        joint = state @ w_s.T + emb @ w_e.T + hidden[..., k, :] @ w_h.T + bias
        g, c, o = joint[..., :R], joint[..., R : 2 * R], joint[..., 2 * R :]
        state = torch.sigmoid(g) * state + (1 - torch.sigmoid(g)) * torch.tanh(c)
        expected.append(torch.tanh(o))
    torch.testing.assert_close(head.latent_block(hidden, prev), torch.stack(expected, dim=-2))


def test_stateless_heads_depend_only_on_their_own_slot_but_rnn_carries_history() -> None:
    hidden, prev = block_inputs()
    changed = prev.clone()
    changed[..., 0] = (prev[..., 0] + 1) % V
    for head_type in MARKOV_HEAD_TYPES:
        head = make_head(head_type)
        before, after = head.latent_block(hidden, prev), head.latent_block(hidden, changed)
        assert not torch.allclose(before[..., 0, :], after[..., 0, :])
        later_same = torch.equal(before[..., 1:, :], after[..., 1:, :])
        assert later_same == (head_type != "rnn"), head_type


# --- serial stepping == teacher forcing -----------------------------------------------------------


@pytest.mark.parametrize("head_type", MARKOV_HEAD_TYPES)
def test_serial_steps_reproduce_latent_block(head_type: str) -> None:
    head = make_head(head_type)
    hidden, prev = block_inputs()
    torch.testing.assert_close(step_through(head, hidden, prev), head.latent_block(hidden, prev))


def test_rnn_state_reset_per_step_does_not_match_latent_block() -> None:
    # The NeMo reference resets the state every step; that must not reproduce the trained recurrence.
    head = make_head("rnn")
    hidden, prev = block_inputs()
    block = head.latent_block(hidden, prev)
    reset = step_through(head, hidden, prev, reset=True)
    torch.testing.assert_close(reset[..., 0, :], block[..., 0, :])
    for k in range(1, B):
        assert not torch.allclose(reset[..., k, :], block[..., k, :], atol=1e-3), k


def test_rnn_latent_step_with_none_state_is_the_first_slot() -> None:
    head = make_head("rnn")
    hidden, prev = block_inputs()
    m_0, state = head.latent_step(hidden[..., 0, :], prev[..., 0], None)
    torch.testing.assert_close(m_0, head.latent_block(hidden, prev)[..., 0, :])
    assert state is not None and state.shape == (*LEAD, R)


@pytest.mark.parametrize("head_type", MARKOV_HEAD_TYPES)
def test_bf16_head_accepts_fp32_hidden_and_computes_in_bf16(head_type: str) -> None:
    head = make_head(head_type).to(torch.bfloat16)
    hidden, prev = block_inputs()
    block = head.latent_block(hidden, prev)
    assert block.dtype == torch.bfloat16
    torch.testing.assert_close(step_through(head, hidden, prev), block)


def test_shape_mismatch_is_rejected() -> None:
    head = make_head("gated")
    hidden, prev = block_inputs()
    with pytest.raises(ValueError, match="prev_tokens"):
        head.latent_block(hidden, prev[..., :-1])
    with pytest.raises(ValueError, match="hidden"):
        head.latent_block(hidden[..., :-1], prev)
    with pytest.raises(ValueError, match="hidden_k"):
        head.latent_step(hidden[..., 0, :], prev, None)


# --- sample_block ---------------------------------------------------------------------------------


def make_lm_head(seed: int = 2) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(H, V, bias=False)


@pytest.mark.parametrize("head_type", MARKOV_HEAD_TYPES)
def test_greedy_sample_block_matches_teacher_forcing_on_its_own_output(head_type: str) -> None:
    head, lm_head = make_head(head_type), make_lm_head()
    hidden, prev = block_inputs()
    first = prev[..., 0]
    tokens, probs, logits = head.sample_block(hidden, first, lm_head)

    teacher_prev = torch.cat([first.unsqueeze(-1), tokens[..., :-1]], dim=-1)
    expected_logits = lm_head(hidden) + head.correction(head.latent_block(hidden, teacher_prev))
    torch.testing.assert_close(logits, expected_logits)
    assert torch.equal(tokens, expected_logits.argmax(dim=-1))
    assert torch.equal(probs, nn.functional.one_hot(tokens, V).float())
    assert tokens.shape == (*LEAD, B) and tokens.dtype == torch.long
    assert probs.dtype == logits.dtype == torch.float32


def test_greedy_sample_block_feeds_back_its_tokens() -> None:
    # Guards the test above against a head whose correction ignores prev: anchoring every slot on
    # the first token must give different logits.
    head, lm_head = make_head("vanilla"), make_lm_head()
    hidden, prev = block_inputs()
    _, _, logits = head.sample_block(hidden, prev[..., 0], lm_head)
    stale_prev = prev[..., :1].expand(*LEAD, B)
    stale = lm_head(hidden) + head.correction(head.latent_block(hidden, stale_prev))
    assert not torch.allclose(logits, stale)


@pytest.mark.parametrize("head_type", MARKOV_HEAD_TYPES)
def test_sampled_block_is_reproducible_and_drawn_from_its_probs(head_type: str) -> None:
    head, lm_head = make_head(head_type), make_lm_head()
    hidden, prev = block_inputs()

    def draw() -> tuple[Tensor, Tensor, Tensor]:
        return head.sample_block(
            hidden,
            prev[..., 0],
            lm_head,
            temperature=0.8,
            top_k=10,
            top_p=0.9,
            generator=torch.Generator().manual_seed(5),
        )

    tokens, probs, logits = draw()
    assert torch.equal(tokens, draw()[0])
    assert (probs.gather(-1, tokens.unsqueeze(-1)) > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(*LEAD, B))
    torch.testing.assert_close(probs, filtered_probs(logits, 0.8, 10, 0.9))
    # It really samples: some slot's token is not its argmax.
    assert not torch.equal(tokens, logits.argmax(-1))
    teacher_prev = torch.cat([prev[..., :1], tokens[..., :-1]], dim=-1)
    torch.testing.assert_close(
        logits, lm_head(hidden) + head.correction(head.latent_block(hidden, teacher_prev))
    )


def test_top_k_one_sampling_equals_greedy() -> None:
    head, lm_head = make_head("rnn"), make_lm_head()
    hidden, prev = block_inputs()
    greedy, _, _ = head.sample_block(hidden, prev[..., 0], lm_head)
    sampled, _, _ = head.sample_block(
        hidden, prev[..., 0], lm_head, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(greedy, sampled)


def test_sample_block_rejects_mismatched_first_token() -> None:
    head, lm_head = make_head("vanilla"), make_lm_head()
    hidden, prev = block_inputs()
    with pytest.raises(ValueError, match="first_token"):
        head.sample_block(hidden, prev, lm_head)


# --- filtered_probs -------------------------------------------------------------------------------


def test_temperature_zero_is_one_hot_argmax() -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    probs = filtered_probs(logits, 0.0, top_k=3, top_p=0.5)
    assert torch.equal(probs, nn.functional.one_hot(logits.argmax(-1), V).float())


def test_temperature_scales_logits_and_output_is_float32() -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    probs = filtered_probs(logits, 0.7)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits.float() / 0.7, dim=-1))


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    probs = filtered_probs(logits, 1.0, top_k=5)
    kept = probs > 0
    assert (kept.sum(-1) == 5).all()
    top5 = torch.zeros_like(kept).scatter_(-1, logits.topk(5, dim=-1).indices, True)
    assert torch.equal(kept, top5)
    renormalised = torch.softmax(logits.masked_fill(~top5, -math.inf), dim=-1)
    torch.testing.assert_close(probs, renormalised)


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.4, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3])]
)
def test_top_p_keeps_the_smallest_nucleus(top_p: float, kept: list[int]) -> None:
    target = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # Shuffle so that the nucleus is not simply a prefix of the vocabulary.
    order = torch.tensor([2, 0, 3, 1])
    logits = target[order].log()
    probs = filtered_probs(logits, 1.0, top_p=top_p)
    expected = torch.zeros(4)
    expected[kept] = target[kept] / target[kept].sum()
    torch.testing.assert_close(probs, expected[order])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.floats(0.05, 3.0),
    top_k=st.one_of(st.none(), st.integers(1, 50)),
    top_p=st.one_of(st.none(), st.floats(0.01, 1.0)),
)
def test_filtered_probs_rows_are_distributions_and_nucleus_is_minimal(
    seed: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(seed)) * 3
    probs = filtered_probs(logits, temperature, top_k, top_p)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert (probs >= 0).all()
    kept = probs > 0
    if top_k is not None:
        assert (kept.sum(-1) <= top_k).all()
    # The kept set is always the most probable tokens of the pre-top-p distribution.
    base = filtered_probs(logits, temperature, top_k, None)
    for row in range(4):
        count = int(kept[row].sum())
        top = base[row].topk(count)
        assert kept[row, top.indices].all()
        if top_p is not None:
            mass = top.values.sum()
            assert mass >= top_p - 1e-5
            assert mass - top.values[-1] < top_p + 1e-5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_filtered_probs_rejects_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        filtered_probs(torch.zeros(2, V), **kwargs)  # type: ignore[arg-type]
