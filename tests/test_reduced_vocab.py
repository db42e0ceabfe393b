"""Reduced-vocabulary drafts: ``lm_head [K, H]`` and ``d2t [K]`` in vLLM's layout, the K tokens chosen
from the training data, the objective against the target's full distribution, and decoding that stays
exactly lossless (greedy equals plain decoding; sampling keeps the target's distribution)."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_speculative import (
    ALPHA,
    SAMPLING_RUNS,
    SAMPLING_VOCAB,
    bigram_logits,
    chi_square_p_value,
    exact_first_tokens,
    make_target,
    prompt,
)
from torch import Tensor
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from dspark_core.cli import main as cli_main
from dspark_core.decoding import plain_generate, speculative_generate
from dspark_core.errors import DraftConfigError
from dspark_core.modeling.loss import DSparkLossConfig, DSparkObjective, dspark_objective
from dspark_core.training.config import TrainConfig
from dspark_core.training.data import Example
from dspark_core.training.draft_vocabulary import select_draft_vocabulary, supervised_token_counts
from dspark_qwen3.modeling import Qwen3DSparkModel

LAYOUT = json.loads((Path(__file__).parent / "fixtures" / "vllm_reduced_vocab" / "layout.json").read_text())


def reduced_draft(
    target: Qwen3ForCausalLM,
    size: int,
    *,
    keep: list[int] | None = None,
    head: str | None = "vanilla",
    rank: int = 8,
    block_size: int = 4,
    seed: int = 1,
) -> Qwen3DSparkModel:
    vocab = target.config.vocab_size
    options: dict[str, Any] = {
        "num_draft_layers": 1,
        "block_size": block_size,
        "mask_token_id": vocab - 1,
        "markov_rank": rank if head is not None else 0,
        "enable_confidence_head": True,
        "confidence_head_with_markov": head is not None,
        "target_layer_ids": [0, target.config.num_hidden_layers - 1],
        "draft_vocab_size": size,
    }
    if head is not None:
        options["markov_head_type"] = head
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SGLang layer-id warning
        torch.manual_seed(seed)
        draft = Qwen3DSparkModel.from_target(target, **options)
    if keep is not None:
        draft.select_draft_vocabulary(torch.tensor(keep), target)
    return draft.eval()


def oracle(target: Qwen3ForCausalLM, keep: list[int], *, block_size: int = 4) -> Qwen3DSparkModel:
    """A reduced draft whose logits on its kept tokens are the bigram target's exactly."""
    vocab = target.config.vocab_size
    draft = reduced_draft(target, len(keep), keep=keep, rank=vocab, block_size=block_size)
    assert draft.markov_head is not None
    with torch.no_grad():
        draft.norm.weight.zero_()
        draft.markov_head.markov_w1.weight.copy_(torch.eye(vocab))
        kept = draft.draft_token_ids()  # keep, sorted: draft id order
        assert kept is not None
        draft.markov_head.markov_w2.weight.copy_(bigram_logits(target).T[kept])
    return draft


# -- the layout vLLM loads ------------------------------------------------------------------------


def test_state_dict_matches_the_vllm_layout(tmp_path: Path) -> None:
    target = make_target(vocab=32, seed=3)
    keep = [0, 2, 3, 5, 8, 13, 21, 30]
    draft = reduced_draft(target, len(keep), keep=keep)
    draft.save_pretrained(tmp_path / "full", safe_serialization=True)
    draft.save_pretrained(tmp_path / "serving", include_target_weights=False, safe_serialization=True)
    sizes = {"V": 32, "K": len(keep), "H": 32, "r": 8}
    for form in ("full", "serving"):
        state = load_file(tmp_path / form / "model.safetensors")
        for key, symbols in LAYOUT["shapes"].items():
            if form == "serving" and key in LAYOUT["optional_in_serving_form"]:
                assert key not in state
                continue
            assert tuple(state[key].shape) == tuple(sizes[s] for s in symbols), key
        assert state["d2t"].dtype == getattr(torch, LAYOUT["dtypes"]["d2t"])
        for key in LAYOUT["required_in_serving_form"]:
            assert key in state
        assert not any(name in state for name in LAYOUT["ignored_by_loader"])
        # vLLM's map_draft_to_target: target id = draft id + d2t[draft id].
        draft_ids = torch.arange(len(keep))
        assert (draft_ids + state["d2t"][draft_ids]).tolist() == keep
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config[LAYOUT["config_field"]] == len(keep) and config["vocab_size"] == 32


def test_d2t_semantics_match_the_documented_example() -> None:
    example = LAYOUT["example"]
    target = make_target(vocab=example["V"], seed=3)
    draft = reduced_draft(target, len(example["draft_to_target"]), keep=example["draft_to_target"])
    assert draft.d2t is not None
    assert draft.d2t.tolist() == example["d2t"]
    ids = draft.draft_token_ids()
    assert ids is not None and ids.tolist() == example["draft_to_target"]
    # lm_head starts from the target's rows of those tokens.
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight[ids])
    assert draft.lm_head.weight.requires_grad and not draft.embed_tokens.weight.requires_grad


def test_full_vocabulary_drafts_keep_their_keys() -> None:
    target = make_target(vocab=32, seed=3)
    full = reduced_draft(target, 32)  # K = V is the full vocabulary
    assert full.d2t is None and "d2t" not in full.state_dict()
    assert not hasattr(full.config, "draft_vocab_size")
    assert not full.lm_head.weight.requires_grad
    with pytest.raises(DraftConfigError, match="draft_vocab_size"):
        reduced_draft(target, 33)


def test_serving_form_loads_with_the_target_and_keeps_its_own_lm_head(tmp_path: Path) -> None:
    target = make_target(vocab=32, seed=3)
    draft = reduced_draft(target, 8, keep=list(range(0, 32, 4)))
    with torch.no_grad():
        draft.lm_head.weight.mul_(3.0)  # trained away from the target's rows
    draft.save_pretrained(tmp_path, include_target_weights=False, safe_serialization=True)
    with pytest.raises(DraftConfigError, match="embed_tokens"):
        Qwen3DSparkModel.from_pretrained(tmp_path)
    loaded = Qwen3DSparkModel.from_pretrained(tmp_path, target=target)
    assert torch.equal(loaded.lm_head.weight, draft.lm_head.weight)
    assert loaded.d2t is not None and draft.d2t is not None and torch.equal(loaded.d2t, draft.d2t)
    loaded.check_fits_target(target)
    assert loaded.lm_head.weight.requires_grad


def test_a_corrupt_d2t_is_refused() -> None:
    target = make_target(vocab=32, seed=3)
    draft = reduced_draft(target, 4, keep=[1, 2, 3, 4])
    assert draft.d2t is not None
    draft.d2t[3] = 40  # maps past the vocabulary
    with pytest.raises(DraftConfigError, match="d2t"):
        draft.check_fits_target(target)


# -- choosing the K tokens ---------------------------------------------------------------------------


def test_top_k_supervised_tokens_with_eos_and_ties_by_lower_id() -> None:
    rows = [
        Example(input_ids=[5, 7, 7, 9, 9, 3, 3, 4], loss_mask=[0, 1, 1, 1, 1, 1, 1, 0]),
        Example(input_ids=[4, 4, 4, 6], loss_mask=[0, 0, 0, 1]),
    ]
    counts = supervised_token_counts(rows, 12)
    assert counts.tolist() == [0, 0, 0, 2, 0, 0, 1, 2, 0, 2, 0, 0]  # unsupervised 4s and 5s are not counted
    chosen = select_draft_vocabulary(counts, 4, required=[1], excluded=[11])
    # EOS 1 is kept though unsupervised; then the count-2 tokens 3, 7 and 9 before the count-1 token 6.
    assert chosen.token_ids == [1, 3, 7, 9]
    chosen = select_draft_vocabulary(counts, 3, required=[1], excluded=[11])
    assert chosen.token_ids == [1, 3, 7]  # the tie between 3, 7 and 9 keeps the lower ids
    assert (chosen.covered, chosen.supervised, chosen.filled) == (4, 7, 0)
    # More room than supervised tokens: the lowest unused ids fill it, never the excluded mask.
    chosen = select_draft_vocabulary(counts, 7, required=[1], excluded=[0])
    assert chosen.token_ids == [1, 2, 3, 4, 6, 7, 9] and chosen.filled == 2
    with pytest.raises(DraftConfigError, match="draft_vocab_size"):
        select_draft_vocabulary(counts, 1, required=[1, 2])


def test_config_option_and_resume_of_runs_saved_without_it() -> None:
    config = TrainConfig.from_mapping({"draft": {"draft_vocab_size": 64}})
    assert config.draft.draft_vocab_size == 64
    assert TrainConfig.from_mapping({"draft-vocab-size": "64"}).draft.draft_vocab_size == 64
    with pytest.raises(ValueError, match="draft_vocab_size must be >= 1"):
        TrainConfig.from_mapping({"draft_vocab_size": 0})
    saved = {k: v for k, v in _flat(TrainConfig()).items() if k != "draft_vocab_size"}
    assert TrainConfig().incompatibilities(saved) == []
    assert config.incompatibilities(saved) == ["draft_vocab_size: (absent) -> 64"]


def _flat(config: TrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(config).items():
        out.update(vars(value) if name in ("draft", "loss") else {name: value})
    return out


# -- the objective --------------------------------------------------------------------------------


def test_objective_is_the_l1_against_the_full_teacher() -> None:
    """The chunked objective equals a direct computation with q scattered onto the target vocabulary."""
    gen = torch.Generator().manual_seed(0)
    vocab, size, hidden, rank, blocks, slots = 20, 7, 6, 3, 5, 4
    keep = torch.tensor([0, 3, 4, 9, 11, 15, 19])
    draft_head = torch.randn(size, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher_head = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    w2 = torch.randn(size, rank, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn(blocks, slots, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.randn(blocks, slots, rank, generator=gen, dtype=torch.float64)
    t = torch.randn(blocks, slots, hidden, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (blocks, slots), generator=gen)
    labels[0, 0], labels[1, 2] = 4, 5  # one label inside the K tokens, one outside
    mask = torch.ones(blocks, slots, dtype=torch.bool)
    config = DSparkLossConfig(ce_weight=0.3, l1_weight=0.7, decay_gamma=None, chunk_size=3)
    out = dspark_objective(
        draft_hidden=h, markov_latent=m, teacher_hidden=t, lm_head_weight=draft_head, markov_w2_weight=w2,
        labels=labels, eval_mask=mask, confidence_logits=None, config=config, all_reduce=False,
        teacher_lm_head_weight=teacher_head, draft_token_ids=keep,
    )  # fmt: skip
    out.loss.backward()
    grads = [g.grad.clone() for g in (h, draft_head, w2)]  # type: ignore[union-attr]
    for g in (h, draft_head, w2):
        g.grad = None

    q_draft = torch.softmax(h @ draft_head.T + m @ w2.T, dim=-1)
    q = torch.zeros(blocks, slots, vocab, dtype=torch.float64).index_copy(-1, keep, q_draft)
    p = torch.softmax(t @ teacher_head.T, dim=-1)
    l1 = (q - p).abs().sum(-1)
    inside = torch.isin(labels, keep)
    to_draft = torch.full((vocab,), 0).index_copy(0, keep, torch.arange(size))
    ce = -torch.log(q_draft.gather(-1, to_draft[labels][..., None]).squeeze(-1)) * inside
    reference = 0.3 * ce.mean() + 0.7 * l1.mean()
    reference.backward()
    assert torch.allclose(out.loss, reference)
    assert torch.allclose(out.l1, l1.mean()) and torch.allclose(out.ce, ce.mean())
    for mine, theirs in zip(grads, (h.grad, draft_head.grad, w2.grad), strict=True):
        assert theirs is not None and torch.allclose(mine, theirs)
    # alpha is the acceptance probability of the scattered q: 1 - TV over the target's vocabulary.
    alpha = out.diagnostics["alpha@0"]
    assert torch.allclose(alpha[0] / alpha[1], (1 - l1[:, 0] / 2).mean())


def test_objective_refuses_a_reduced_draft_without_the_teacher_head() -> None:
    target = make_target(vocab=32, seed=3)
    draft = reduced_draft(target, 8, keep=list(range(8)))
    ids = torch.randint(0, 31, (1, 16))
    features = torch.randn(1, 16, 2 * 32)
    output = draft(ids, features, torch.randn(1, 16, 32), torch.ones(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_lm_head"):
        DSparkObjective()(draft, output)
    loss = DSparkObjective(teacher_lm_head=target.lm_head.weight)(draft, output).loss
    loss.backward()
    assert draft.lm_head.weight.grad is not None and draft.embed_tokens.weight.grad is None


# -- decoding stays lossless -------------------------------------------------------------------


@pytest.mark.parametrize("head", [None, "vanilla", "rnn"])
def test_greedy_equals_plain_decoding(head: str | None) -> None:
    target = make_target(seed=3)
    draft = reduced_draft(target, 12, keep=list(range(0, 24, 2)), head=head, seed=11)
    for seed in range(3):
        ids = prompt(3 + 4 * seed, 32, seed)
        spec = speculative_generate(target, draft, ids, max_new_tokens=20, eos_token_id=[])
        plain = plain_generate(target, ids, max_new_tokens=20, eos_token_id=[])
        assert spec.sequences.tolist() == plain.sequences.tolist()


def test_greedy_oracle_accepts_its_tokens_and_rejects_the_others() -> None:
    target = make_target(vocab=16, seed=5, bigram=True)
    keep = [*range(0, 16, 2), 1, 3]
    draft = oracle(target, keep)
    ids = prompt(5, 16, 2)
    spec = speculative_generate(target, draft, ids, max_new_tokens=40, eos_token_id=[])
    plain = plain_generate(target, ids, max_new_tokens=40, eos_token_id=[])
    assert spec.sequences.tolist() == plain.sequences.tolist()
    new = plain.sequences[0, ids.shape[1] :].tolist()
    assert any(t not in keep for t in new), "the target never left the draft's tokens; nothing was rejected"
    assert max(spec.metrics.accepted_per_round) >= 2, "the oracle's own tokens should be accepted"


def proposal_support(draft: Qwen3DSparkModel, target: Qwen3ForCausalLM, ids: Tensor) -> Tensor:
    from dspark_core.modeling.features import capture_target_features

    features = capture_target_features(target, ids, draft.config.target_layer_ids).features
    proposal = draft.propose(ids[:, -1], features[:, :-1], draft.new_cache(), temperature=1.0)
    return proposal.probs


def test_proposals_are_target_ids_with_q_only_on_the_kept_tokens() -> None:
    target = make_target(vocab=32, seed=3)
    keep = [1, 4, 6, 9, 17, 25]
    draft = reduced_draft(target, len(keep), keep=keep)
    probs = proposal_support(draft, target, prompt(6, 32, 1))
    assert probs.shape[-1] == 32
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]))
    outside = torch.ones(32, dtype=torch.bool)
    outside[keep] = False
    assert bool((probs[..., outside] == 0).all()) and bool((probs[..., keep] > 0).all())


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5, "top_p": 0.9}])
def test_sampling_matches_the_target_distribution(sampling: dict[str, Any]) -> None:
    target = make_target(vocab=SAMPLING_VOCAB, seed=21, sharpness=12.0)
    keep = [0, 2, 3, 5, 6]  # 1, 4 and 7 only ever come from the residual
    draft = reduced_draft(target, len(keep), keep=keep, rank=SAMPLING_VOCAB, block_size=2, seed=7)
    assert draft.markov_head is not None
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        draft.markov_head.markov_w1.weight.copy_(torch.eye(SAMPLING_VOCAB))
        draft.markov_head.markov_w2.weight.normal_(0.0, 2.5)
    ids = prompt(4, SAMPLING_VOCAB, 9)
    expected = exact_first_tokens(target, ids, 3, **sampling)
    counts: Counter[tuple[int, ...]] = Counter()
    first_round: Counter[int] = Counter()
    for seed in range(SAMPLING_RUNS):
        result = speculative_generate(
            target, draft, ids, max_new_tokens=4, seed=seed, eos_token_id=[], check_fit=seed == 0, **sampling
        )
        counts[tuple(result.new_tokens[:3])] += 1
        first_round[result.metrics.accepted_per_round[0]] += 1
    p_value = chi_square_p_value(counts, expected, SAMPLING_RUNS)
    assert p_value > ALPHA, f"sampled first tokens differ from the target's distribution (p={p_value:.2e})"
    assert first_round[0] >= 0.2 * SAMPLING_RUNS and first_round[0] < SAMPLING_RUNS
    assert any(set(outcome) & {1, 4, 7} for outcome in counts), "no token outside the draft's vocabulary"


# -- train, save, load, decode ----------------------------------------------------------------------


@pytest.mark.slow
def test_trains_saves_loads_and_decodes_greedy_identically(tmp_path: Path) -> None:
    target_dir = tmp_path / "target"
    assert cli_main(["make-tiny-target", str(target_dir), "--random", "--num-layers", "2"]) == 0
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    vocab = int(target.config.vocab_size)
    # Pre-tokenised rows over a skewed token distribution, so the top K is well defined.
    gen = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, 201, dtype=torch.float64)
    rows = []
    for _ in range(16):
        ids = (torch.multinomial(weights, 48, replacement=True, generator=gen) + 10).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * 8 + [1] * 40})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = ["train", "--target", str(target_dir), "--data", str(data), "--output", str(run)]
    args += ["--num-draft-layers", "1", "--block-size", "4", "--num-anchors", "8", "--markov-rank", "8"]
    args += ["--batch-size", "4", "--max-steps", "3", "--log-every", "1", "--no-progress"]
    args += ["--draft-vocab-size", "32", "--device", "cpu"]
    assert cli_main(args) == 0

    draft = Qwen3DSparkModel.from_pretrained(run / "draft").eval()
    assert draft.config.draft_vocab_size == 32 and draft.config.vocab_size == vocab
    kept = draft.draft_token_ids()
    assert kept is not None
    counts = supervised_token_counts(
        [Example(r["input_ids"], r["loss_mask"]) for r in rows], vocab
    )  # fmt: skip
    eos = target.config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    assert set(eos_ids) <= set(kept.tolist())
    expected = select_draft_vocabulary(counts, 32, required=eos_ids, excluded=[draft.config.mask_token_id])
    assert kept.tolist() == expected.token_ids
    # The draft's own lm_head was trained away from the target's rows it started from.
    assert not torch.equal(draft.lm_head.weight, target.lm_head.weight[kept])
    state = load_file(run / "draft" / "model.safetensors")
    assert tuple(state["lm_head.weight"].shape) == (32, target.config.hidden_size)
    assert tuple(state["d2t"].shape) == (32,) and state["d2t"].dtype == torch.int64

    draft.check_fits_target(target)
    for seed in range(2):
        ids = torch.tensor([rows[seed]["input_ids"][:12]])
        spec = speculative_generate(target, draft, ids, max_new_tokens=16, eos_token_id=[])
        plain = plain_generate(target, ids, max_new_tokens=16, eos_token_id=[])
        assert spec.sequences.tolist() == plain.sequences.tolist()
