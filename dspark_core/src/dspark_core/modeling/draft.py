"""``DSparkDraftModel``: everything a DSpark draft does except its backbone layers.

A family subclasses it and supplies the layers (attention from the block to ``[context ; block]``),
the norm class and ``config_from_target``; it may also replace the embedding (``make_embedding``, e.g.
a scaled one) and the rotary embedding (``make_rotary``). The base owns the frozen target embeddings
and ``lm_head`` (with the config's ``final_logit_softcapping`` when set), the context projection
(``fc`` + ``hidden_norm``), the Markov and confidence heads, the training forward (anchors, masks,
objective) and the decode-time block proposal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from dspark_core.errors import DraftConfigError
from dspark_core.modeling import blocks, masks
from dspark_core.modeling.attention import RotaryEmbedding
from dspark_core.modeling.confidence import ConfidenceHead
from dspark_core.modeling.draft_config import validate_dspark_config
from dspark_core.modeling.fit import check_config_fits_target, check_shares_target_weights
from dspark_core.modeling.markov import MarkovHead, build_markov_head
from dspark_core.modeling.sampling import filtered_probs

TARGET_WEIGHT_KEYS = ("embed_tokens.weight", "lm_head.weight")


class DraftKVCache:
    """Context-only keys and values of every draft layer, ``[b, kv_heads, C, head_dim]`` each.

    Only context rows are appended; a proposal's block keys and values are never stored, so
    after each proposal the cache already holds exactly the committed context.
    """

    def __init__(self, num_layers: int) -> None:
        self._keys: list[Tensor | None] = [None] * num_layers
        self._values: list[Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Number of context positions held, which is the position of the next anchor."""
        keys = self._keys[0]
        return 0 if keys is None else int(keys.shape[2])

    def extend(self, layer_index: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append a layer's new context rows; returns that layer's whole context."""
        old_keys, old_values = self._keys[layer_index], self._values[layer_index]
        if old_keys is not None and old_values is not None:
            keys = torch.cat([old_keys, keys], dim=2)
            values = torch.cat([old_values, values], dim=2)
        self._keys[layer_index], self._values[layer_index] = keys, values
        return keys, values

    def settle_at(self, anchor_position: int) -> None:
        """After a proposal at ``anchor_position``: hold exactly the context before the anchor.

        A proposal's own block keys and values must not stay, so a cache that kept them is cut
        back; one holding fewer rows means ``propose`` skipped context and decoding cannot go on.
        """
        if self.length < anchor_position:
            raise RuntimeError(
                f"the draft cache holds {self.length} context rows after a proposal at anchor position "
                f"{anchor_position}; propose() must append every new context row"
            )
        if self.length > anchor_position:
            self.crop(anchor_position)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` context positions."""
        if length < 0 or length > self.length:
            raise ValueError(f"cannot crop a draft cache of length {self.length} to {length}")
        for i, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            if keys is not None and values is not None:
                self._keys[i], self._values[i] = keys[:, :, :length], values[:, :, :length]


@dataclass
class BlockProposal:
    """One decode-time proposal: slot k proposes the token for position ``s + k + 1``."""

    tokens: Tensor  # [b, n] long
    probs: Tensor  # [b, n, V] float32: q_k, the (filtered) distribution token k was drawn from
    logits: Tensor  # [b, n, V] float32, Markov-corrected, unfiltered
    confidence: Tensor | None  # [b, n] float32 logits; sigmoid gives the predicted acceptance


@dataclass
class DSparkDraftOutput:
    """The training forward's block outputs, each ``[b, N, B, ...]``; the objective
    (:class:`~dspark_core.modeling.loss.DSparkObjective`) turns them into the loss."""

    hidden: Tensor  # [b, N, B, H] final (normed) draft states
    markov_latent: Tensor | None  # [b, N, B, r]; None without a Markov head
    confidence_logits: Tensor | None  # [b, N, B]; None without a confidence head
    teacher_hidden: Tensor  # [b, N, B, H] the target's final states at each slot's position
    labels: Tensor  # [b, N, B] the token each slot should propose
    eval_mask: Tensor  # [b, N, B] bool: the slots the objective supervises
    anchors: Tensor  # [b, N]
    keep: Tensor  # [b, N] bool
    logits: Tensor | None = None  # [b, N, B, V] float32, only with return_logits


class DSparkDraftModel(PreTrainedModel):
    """Family-agnostic DSpark draft. Subclasses implement :meth:`build_layers`, :meth:`make_norm`
    and :meth:`config_from_target`.

    Each layer is called as ``layer(hidden, context, block_rope, context_rope, mask, cache, index)``
    and must attend from ``hidden`` (the block) to ``[context ; hidden]``, extending ``cache`` with
    the context keys/values when a cache is given.
    """

    base_model_prefix = ""
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flex_attn = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        validate_dspark_config(config)
        hidden, vocab = config.hidden_size, config.vocab_size
        num_features = len(config.target_layer_ids)
        self.embed_tokens = self.make_embedding(config)
        self.layers = self.build_layers(config)
        self.norm = self.make_norm(config)
        self.rotary_emb = self.make_rotary(config)
        self.fc = nn.Linear(num_features * hidden, hidden, bias=False)
        self.hidden_norm = self.make_norm(config)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        rank = int(getattr(config, "markov_rank", 0))
        self.markov_head: MarkovHead | None = None
        if rank > 0:
            self.markov_head = build_markov_head(config.markov_head_type, vocab, hidden, rank)
        self.confidence_head: ConfidenceHead | None = None
        if getattr(config, "enable_confidence_head", False):
            with_markov = bool(getattr(config, "confidence_head_with_markov", False))
            self.confidence_head = ConfidenceHead(hidden, rank, with_markov=with_markov)
        self.post_init()
        self.freeze_target_weights()

    # -- what a family provides ---------------------------------------------------------------

    def build_layers(self, config: PretrainedConfig) -> nn.ModuleList:
        raise NotImplementedError(f"{type(self).__name__} must implement build_layers(config)")

    def make_norm(self, config: PretrainedConfig) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement make_norm(config)")

    def make_embedding(self, config: PretrainedConfig) -> nn.Embedding:
        """The token embedding, ``[vocab_size, hidden_size]`` under the key ``embed_tokens.weight``
        (a family whose target scales its embeddings returns an ``nn.Embedding`` subclass)."""
        return nn.Embedding(config.vocab_size, config.hidden_size)

    def make_rotary(self, config: PretrainedConfig) -> nn.Module:
        """The rotary embedding: ``rotary(position_ids [b, T], dtype) -> (cos, sin)``, each
        ``[b, T, head_dim]`` (a family whose draft layers use another head size or per-layer-type
        rope parameters returns ``RotaryEmbedding(config, layer_type=..., head_dim=...)``)."""
        return RotaryEmbedding(config)

    @classmethod
    def config_from_target(cls, target_config: PretrainedConfig, **options: Any) -> PretrainedConfig:
        raise NotImplementedError(f"{cls.__name__} must implement config_from_target(target_config, ...)")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_target(cls, target: PreTrainedModel, **options: Any) -> DSparkDraftModel:
        """A new draft for ``target``: config from the target's, embeddings and ``lm_head`` copied."""
        config = cls.config_from_target(target.config, **options)
        draft = cls(config)
        reference = next(target.parameters())
        draft.to(device=reference.device, dtype=reference.dtype)  # type: ignore[call-arg]
        draft.attach_target_weights(target)
        return draft

    def attach_target_weights(self, target: PreTrainedModel) -> None:
        """Copy the target's input embeddings and ``lm_head`` into the draft, frozen."""
        embeddings: Any = target.get_input_embeddings()
        head: Any = target.get_output_embeddings()
        if embeddings is None or head is None:
            raise DraftConfigError(f"{type(target).__name__} has no input embeddings or lm_head to copy")
        pairs: tuple[tuple[str, Tensor, Tensor], ...] = (
            ("embed_tokens", embeddings.weight, self.embed_tokens.weight),
            ("lm_head", head.weight, self.lm_head.weight),
        )
        for name, source, dest in pairs:
            if tuple(source.shape) != tuple(dest.shape):
                raise DraftConfigError(
                    f"the target's {name} has shape {tuple(source.shape)} but this draft expects "
                    f"{tuple(dest.shape)}: the draft was built for a different target "
                    "(vocab_size/hidden_size)"
                )
            with torch.no_grad():
                dest.copy_(source.detach().to(dtype=dest.dtype, device=dest.device))
        self.freeze_target_weights()

    def freeze_target_weights(self) -> None:
        """The embeddings and ``lm_head`` are the target's: never trained."""
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Any,
        *model_args: Any,
        target: PreTrainedModel | None = None,
        **kwargs: Any,
    ) -> Any:
        """``PreTrainedModel.from_pretrained``, plus loading a checkpoint without the target's weights.

        A checkpoint that omits ``embed_tokens`` and ``lm_head`` (the form vLLM and SGLang also load)
        needs ``target=``, whose weights are attached.
        """
        want_info = kwargs.pop("output_loading_info", False)
        loaded: Any = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        model: DSparkDraftModel = loaded[0]
        info: dict[str, Any] = loaded[1]
        missing = set(info.get("missing_keys", ()))
        absent = [key for key in TARGET_WEIGHT_KEYS if key in missing]
        if absent:
            if target is None:
                raise DraftConfigError(
                    f"checkpoint {str(pretrained_model_name_or_path)!r} has no {' or '.join(absent)} "
                    "(a serving-engine checkpoint without the target's weights); pass target=<the target "
                    "model> to attach its embeddings and lm_head"
                )
            model.attach_target_weights(target)
            info["missing_keys"] = type(info["missing_keys"])(k for k in missing if k not in absent)
        other = sorted(missing - set(TARGET_WEIGHT_KEYS))
        if other:
            raise DraftConfigError(
                f"checkpoint {str(pretrained_model_name_or_path)!r} is missing draft weights {other}; "
                "it was saved by a different draft configuration or is incomplete"
            )
        model.freeze_target_weights()
        return (model, info) if want_info else model

    def save_pretrained(
        self, save_directory: Any, *args: Any, include_target_weights: bool = True, **kwargs: Any
    ) -> Any:
        """``save_pretrained``; ``include_target_weights=False`` writes the serving-engine form
        without ``embed_tokens`` and ``lm_head``."""
        if not include_target_weights and "state_dict" not in kwargs:
            kwargs["state_dict"] = {k: v for k, v in self.state_dict().items() if k not in TARGET_WEIGHT_KEYS}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RotaryEmbedding):
            module.reset_frequencies()
            return
        super()._init_weights(module)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the model file's source; our layers read
        # config._attn_implementation on every call, so set_attn_implementation() is safe.
        return True

    # -- fitting a target -----------------------------------------------------------------------

    def check_fits_target(self, target: nn.Module) -> None:
        """Raise :class:`~dspark_core.errors.DraftConfigError` if this draft cannot draft for ``target``.

        The config is validated again as a whole (it can be edited after construction), then
        compared with the target (:mod:`dspark_core.modeling.fit`), and ``embed_tokens`` and
        ``lm_head`` must be the target's.
        """
        validate_dspark_config(self.config)
        check_config_fits_target(self.config, target)
        check_shares_target_weights(self, target)

    # -- shared pieces ------------------------------------------------------------------------

    @property
    def attention_implementation(self) -> str:
        return str(getattr(self.config, "_attn_implementation", None) or "sdpa")

    def encode_context(self, target_features: Tensor) -> Tensor:
        """``hidden_norm(fc(features))``: computed once, shared by every layer."""
        projected: Tensor = self.hidden_norm(self.fc(target_features.to(self.fc.weight.dtype)))
        return projected

    def run_layers(
        self,
        hidden: Tensor,
        context: Tensor,
        block_positions: Tensor,
        context_positions: Tensor,
        mask: Any,
        cache: DraftKVCache | None,
    ) -> Tensor:
        """The backbone: every layer over ``[context ; block]``, then the final norm."""
        block_rope = self.rotary_emb(block_positions, hidden.dtype)
        context_rope = self.rotary_emb(context_positions, hidden.dtype)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, context, block_rope, context_rope, mask, cache, index)
        normed: Tensor = self.norm(hidden)
        return normed

    def _check_forward_inputs(
        self,
        input_ids: Tensor,
        target_features: Tensor,
        target_final_hidden: Tensor,
        loss_mask: Tensor,
        document_ids: Tensor | None,
    ) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        width = len(self.config.target_layer_ids) * self.config.hidden_size
        expected: Mapping[str, tuple[Tensor | None, tuple[int, ...]]] = {
            "target_features": (target_features, (b, s, width)),
            "target_final_hidden": (target_final_hidden, (b, s, self.config.hidden_size)),
            "loss_mask": (loss_mask, (b, s)),
            "document_ids": (document_ids, (b, s)),
        }
        for name, (tensor, shape) in expected.items():
            if tensor is not None and tuple(tensor.shape) != shape:
                extra = (
                    f" (len(target_layer_ids)={len(self.config.target_layer_ids)} x hidden_size="
                    f"{self.config.hidden_size})"
                    if name == "target_features"
                    else ""
                )
                raise ValueError(f"{name} must have shape {shape}{extra}, got {tuple(tensor.shape)}")
        if s < 2:
            raise ValueError(f"input_ids needs at least 2 positions to form a block, got seq_len={s}")

    # -- training -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        target_features: Tensor,
        target_final_hidden: Tensor,
        loss_mask: Tensor,
        *,
        document_ids: Tensor | None = None,
        anchors: Tensor | None = None,
        keep: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> DSparkDraftOutput:
        """The training forward over ``N`` sampled blocks per row; the loss is the objective's job.

        ``target_features`` ``[b, S, L*H]`` are the target's hidden states at ``target_layer_ids``;
        ``target_final_hidden`` ``[b, S, H]`` its final-norm states (teacher logits come from them
        through the shared ``lm_head``). ``anchors``/``keep`` ``[b, N]`` fix the blocks; by default
        they are sampled from ``loss_mask`` with ``generator``.
        """
        self._check_forward_inputs(input_ids, target_features, target_final_hidden, loss_mask, document_ids)
        config = self.config
        block_size = int(config.block_size)
        seq_len = input_ids.shape[1]
        if anchors is None:
            anchors, keep = blocks.sample_anchors(
                loss_mask, int(config.num_anchors), document_ids=document_ids, generator=generator
            )
        elif keep is None:
            keep = torch.ones_like(anchors, dtype=torch.bool)
        assert keep is not None
        hidden = self._block_backbone(input_ids, target_features, anchors, keep, document_ids)

        previous = blocks.block_previous_tokens(input_ids, anchors, block_size)
        latent = self.markov_head.latent_block(hidden, previous) if self.markov_head is not None else None
        confidence = self._confidence(hidden, previous)
        labels = blocks.block_labels(input_ids, anchors, block_size)
        eval_mask = blocks.block_eval_mask(loss_mask, anchors, keep, block_size, document_ids)
        teacher = blocks.gather_blocks(
            target_final_hidden, blocks.block_target_positions(anchors, block_size, seq_len)
        )

        logits = self.block_logits(hidden, latent) if return_logits else None
        return DSparkDraftOutput(
            hidden=hidden,
            markov_latent=latent,
            confidence_logits=confidence,
            teacher_hidden=teacher,
            labels=labels,
            eval_mask=eval_mask,
            anchors=anchors,
            keep=keep,
            logits=logits,
        )

    def _block_backbone(
        self,
        input_ids: Tensor,
        target_features: Tensor,
        anchors: Tensor,
        keep: Tensor,
        document_ids: Tensor | None,
    ) -> Tensor:
        """Every block ``[x_a, MASK, ...]`` through the layers at once: final states ``[b, N, B, H]``."""
        block_size = int(self.config.block_size)
        batch, seq_len = input_ids.shape
        num_anchors = anchors.shape[1]
        context = self.encode_context(target_features)
        context_positions = blocks.context_position_ids(
            seq_len, document_ids=document_ids, batch_size=batch
        ).to(input_ids.device)
        block_ids = blocks.block_input_ids(
            input_ids, anchors, keep, block_size, int(self.config.mask_token_id)
        )
        block_positions = blocks.block_position_ids(anchors, block_size, context_positions)
        hidden = self.embed_tokens(block_ids).reshape(batch, num_anchors * block_size, -1)
        hidden = hidden.to(context.dtype)
        if self.attention_implementation == "flex_attention":
            mask: Any = masks.flex_block_mask(anchors, keep, seq_len, block_size, document_ids)
        else:
            mask = masks.dense_block_mask(
                anchors, keep, seq_len, block_size, document_ids, dtype=hidden.dtype
            )
        hidden = self.run_layers(
            hidden, context, block_positions.reshape(batch, -1), context_positions, mask, cache=None
        )
        return hidden.reshape(batch, num_anchors, block_size, -1)

    @property
    def logit_softcap(self) -> float | None:
        """The config's ``final_logit_softcapping`` (Gemma): base logits become ``c * tanh(z / c)``."""
        cap = getattr(self.config, "final_logit_softcapping", None)
        return None if cap is None else float(cap)

    def base_logits(self, hidden: Tensor) -> Tensor:
        """``lm_head(h)`` in float32, soft-capped when the config says so (before any Markov term)."""
        logits: Tensor = self.lm_head(hidden).float()
        cap = self.logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def block_logits(self, hidden: Tensor, latent: Tensor | None) -> Tensor:
        """``base_logits(h) + markov_w2(m)`` in float32."""
        logits = self.base_logits(hidden)
        if latent is not None and self.markov_head is not None:
            logits = logits + self.markov_head.correction(latent).float()
        return logits

    def _confidence(self, hidden: Tensor, previous: Tensor) -> Tensor | None:
        head = self.confidence_head
        if head is None:
            return None
        features = None
        if head.with_markov and self.markov_head is not None:
            features = self.markov_head.embed_previous(previous)
        confidence: Tensor = head(hidden, features)
        return confidence

    # -- decoding -----------------------------------------------------------------------------

    def new_cache(self) -> DraftKVCache:
        """An empty context cache for :meth:`propose`."""
        return DraftKVCache(len(self.layers))

    def block_hidden(self, anchor_tokens: Tensor, context_features: Tensor, cache: DraftKVCache) -> Tensor:
        """Decode-time block forward: append the new context rows to ``cache``, then run the block
        ``[x_s, MASK, ...]`` at positions ``s..s+B-1`` (``s`` = context length) over all cached
        context and the whole block. Returns the final hidden states ``[b, B, H]``."""
        if anchor_tokens.dim() != 1:
            raise ValueError(f"anchor_tokens must be [batch], got shape {tuple(anchor_tokens.shape)}")
        batch = anchor_tokens.shape[0]
        width = len(self.config.target_layer_ids) * self.config.hidden_size
        if (
            context_features.dim() != 3
            or context_features.shape[0] != batch
            or context_features.shape[2] != width
        ):
            raise ValueError(
                f"context_features must be [batch={batch}, new_rows, {width}], "
                f"got {tuple(context_features.shape)}"
            )
        block_size = int(self.config.block_size)
        device = anchor_tokens.device
        start = cache.length
        new_rows = context_features.shape[1]
        context = self.encode_context(context_features)
        context_positions = torch.arange(start, start + new_rows, device=device).expand(batch, new_rows)
        anchor = start + new_rows
        block_ids = torch.full((batch, block_size), int(self.config.mask_token_id), device=device)
        block_ids[:, 0] = anchor_tokens
        block_positions = torch.arange(anchor, anchor + block_size, device=device).expand(batch, block_size)
        hidden = self.embed_tokens(block_ids).to(context.dtype)
        return self.run_layers(hidden, context, block_positions, context_positions, None, cache)

    @torch.no_grad()
    def propose(
        self,
        anchor_tokens: Tensor,
        context_features: Tensor,
        cache: DraftKVCache,
        *,
        num_slots: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> BlockProposal:
        """Propose up to ``block_size`` tokens after ``anchor_tokens``, sampled serially through the
        Markov head (``prev_0 = x_s``, ``prev_k = d_{k-1}``), with their distributions ``q``."""
        block_size = int(self.config.block_size)
        slots = block_size if num_slots is None else int(num_slots)
        if not 1 <= slots <= block_size:
            raise ValueError(f"num_slots must lie in [1, block_size={block_size}], got {slots}")
        hidden = self.block_hidden(anchor_tokens, context_features, cache)[:, :slots]
        if self.markov_head is not None:
            tokens, probs, logits = self.markov_head.sample_block(
                hidden,
                anchor_tokens,
                self.base_logits,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
        else:
            logits = self.block_logits(hidden, None)
            probs = filtered_probs(logits, temperature, top_k, top_p)
            tokens = _draw(probs, generator)
        previous = torch.cat([anchor_tokens.unsqueeze(1), tokens[:, :-1]], dim=1)
        return BlockProposal(
            tokens=tokens, probs=probs, logits=logits, confidence=self._confidence(hidden, previous)
        )


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return drawn
