"""``DSparkDraftModel``: everything a DSpark draft does except its backbone layers.

A family subclasses it and supplies the layers (attention from the block to ``[context ; block]``),
the norm class and ``config_from_target``. The base owns the frozen target embeddings and
``lm_head``, the context projection (``fc`` + ``hidden_norm``), the Markov and confidence heads,
the training forward (anchors, masks, objective) and the decode-time block proposal.
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

    Rows of a batch may hold different numbers of context positions (batched decoding, where each
    row accepts its own number of tokens): row ``i`` holds its first ``row_lengths[i]`` positions and
    whatever lies past them is stale and masked out. Between :meth:`begin` and :meth:`end` (one
    ``block_hidden`` call) :meth:`extend` writes each row's new rows right after its own context.
    """

    def __init__(self, num_layers: int) -> None:
        self._keys: list[Tensor | None] = [None] * num_layers
        self._values: list[Tensor | None] = [None] * num_layers
        # None: every row holds the whole stored width (the batch-1 case).
        self._lengths: Tensor | None = None
        self._starts: Tensor | None = None
        self._new_rows: Tensor | None = None

    @property
    def width(self) -> int:
        """Positions stored per row, stale ones included."""
        keys = self._keys[0]
        return 0 if keys is None else int(keys.shape[2])

    @property
    def length(self) -> int:
        """Context positions held (the longest row's), which is the position of the next anchor."""
        return self.width if self._lengths is None else int(self._lengths.max())

    def row_lengths(self, batch: int, device: torch.device) -> Tensor:
        """``[batch]`` long: the context positions each row holds."""
        if self._lengths is not None:
            if self._lengths.shape[0] != batch:
                raise ValueError(f"the draft cache holds {self._lengths.shape[0]} rows, not {batch}")
            return self._lengths.to(device)
        return torch.full((batch,), self.width, dtype=torch.long, device=device)

    @property
    def ragged(self) -> bool:
        """Whether some row holds fewer positions than are stored."""
        return self._lengths is not None and bool((self._lengths != self.width).any())

    def begin(self, starts: Tensor, new_rows: Tensor) -> None:
        """Before a forward: row ``i`` writes its new rows at ``starts[i]``; ``new_rows[i]`` of them count."""
        self._starts, self._new_rows = starts, new_rows

    def end(self) -> None:
        """After a forward: each row holds its previous context and its counted new rows."""
        if self._starts is not None and self._new_rows is not None:
            lengths = self._starts + self._new_rows
            self._lengths = None if bool((lengths == self.width).all()) else lengths
        self._starts = self._new_rows = None

    def extend(self, layer_index: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append a layer's new context rows; returns that layer's whole context (stale rows included)."""
        old_keys, old_values = self._keys[layer_index], self._values[layer_index]
        starts = self._starts
        if old_keys is None or old_values is None:
            if starts is not None and bool((starts != 0).any()):
                raise RuntimeError("a ragged write into an empty draft cache layer")
        elif starts is None or bool((starts == old_keys.shape[2]).all()):
            keys = torch.cat([old_keys, keys], dim=2)
            values = torch.cat([old_values, values], dim=2)
        else:
            keys, values = _write_rows(old_keys, keys, starts), _write_rows(old_values, values, starts)
        self._keys[layer_index], self._values[layer_index] = keys, values
        return keys, values

    def settle_at(self, anchor_position: int | Tensor) -> None:
        """After a proposal at ``anchor_position`` (one per row, or one for all): hold exactly the
        context before the anchor.

        A proposal's own block keys and values must not stay, so a cache that kept them is cut
        back; one holding fewer rows means ``propose`` skipped context and decoding cannot go on.
        """
        if isinstance(anchor_position, Tensor):
            held = self.row_lengths(anchor_position.shape[0], anchor_position.device)
            if bool((held < anchor_position).any()):
                raise RuntimeError(
                    f"the draft cache holds {held.tolist()} context rows after a proposal at anchor "
                    f"positions {anchor_position.tolist()}; propose() must append every new context row"
                )
            if bool((held > anchor_position).any()):
                self._lengths = anchor_position.clone()
                self.crop(int(anchor_position.max()))
            return
        if self.length < anchor_position:
            raise RuntimeError(
                f"the draft cache holds {self.length} context rows after a proposal at anchor position "
                f"{anchor_position}; propose() must append every new context row"
            )
        if self.length > anchor_position:
            self.crop(anchor_position)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` context positions (of every row)."""
        if length < 0 or length > self.length:
            raise ValueError(f"cannot crop a draft cache of length {self.length} to {length}")
        for i, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            if keys is not None and values is not None:
                self._keys[i], self._values[i] = keys[:, :, :length], values[:, :, :length]
        if self._lengths is not None:
            self._lengths = self._lengths.clamp_max(length)
            if bool((self._lengths == self.width).all()):
                self._lengths = None

    def add_rows(self, existing: int, count: int) -> None:
        """``count`` empty rows join after the ``existing`` ones (prompts joining a running batch)."""
        keys = self._keys[0]
        device = keys.device if keys is not None else torch.device("cpu")
        held = self.row_lengths(existing, device)
        for i, (stored_keys, stored_values) in enumerate(zip(self._keys, self._values, strict=True)):
            if stored_keys is not None and stored_values is not None:
                pad = stored_keys.new_zeros((count, *stored_keys.shape[1:]))
                self._keys[i] = torch.cat([stored_keys, pad])
                self._values[i] = torch.cat([stored_values, pad.to(stored_values.dtype)])
        lengths = torch.cat([held, torch.zeros(count, dtype=torch.long, device=device)])
        self._lengths = None if bool((lengths == self.width).all()) else lengths

    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished rows leave the batch)."""
        for i, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            if keys is not None and values is not None:
                self._keys[i] = keys.index_select(0, rows.to(keys.device))
                self._values[i] = values.index_select(0, rows.to(values.device))
        if self._lengths is not None:
            self._lengths = self._lengths.index_select(0, rows.to(self._lengths.device))
            if bool((self._lengths == self.width).all()):
                self._lengths = None


def _write_rows(stored: Tensor, new: Tensor, starts: Tensor) -> Tensor:
    """``stored [b, h, C, d]`` widened to ``max(starts) + R``, with row ``i``'s ``R`` new positions
    written from ``starts[i]`` on."""
    batch, heads, rows, dim = new.shape
    width = int(starts.max()) + rows
    if stored.shape[2] >= width:
        out = stored[:, :, :width].clone()
    else:
        pad = stored.new_zeros(batch, heads, width - stored.shape[2], dim)
        out = torch.cat([stored, pad], dim=2)
    index = (starts.to(new.device).view(batch, 1) + torch.arange(rows, device=new.device)).view(
        batch, 1, rows, 1
    )
    return out.scatter_(2, index.expand(batch, heads, rows, dim), new.to(out.dtype))


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
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = self.build_layers(config)
        self.norm = self.make_norm(config)
        self.rotary_emb = RotaryEmbedding(config)
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

    def block_logits(self, hidden: Tensor, latent: Tensor | None) -> Tensor:
        """``lm_head(h) + markov_w2(m)`` in float32."""
        logits: Tensor = self.lm_head(hidden).float()
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

    def block_hidden(
        self,
        anchor_tokens: Tensor,
        context_features: Tensor,
        cache: DraftKVCache,
        context_rows: Tensor | None = None,
    ) -> Tensor:
        """Decode-time block forward: append the new context rows to ``cache``, then run the block
        ``[x_s, MASK, ...]`` at positions ``s..s+B-1`` (``s`` = context length) over all cached
        context and the whole block. Returns the final hidden states ``[b, B, H]``.

        ``context_rows [b]`` (batched decoding) says how many of the ``context_features`` rows count
        for each row; the rest is padding. Rows may then hold contexts of different lengths, and each
        row's block sits right after its own context."""
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
        new_rows = context_features.shape[1]
        starts = cache.row_lengths(batch, device)
        counts = (
            torch.full((batch,), new_rows, dtype=torch.long, device=device)
            if context_rows is None
            else context_rows.to(device=device, dtype=torch.long)
        )
        context = self.encode_context(context_features)
        anchor = starts + counts
        context_positions = _row_positions(starts, new_rows)
        block_ids = torch.full((batch, block_size), int(self.config.mask_token_id), device=device)
        block_ids[:, 0] = anchor_tokens
        block_positions = _row_positions(anchor, block_size)
        hidden = self.embed_tokens(block_ids).to(context.dtype)
        stored = int(starts.max()) + new_rows if batch else new_rows
        mask = None
        if bool((anchor != stored).any()):
            # Some row's context is shorter than what is stored: its stale positions are masked out.
            mask = self._ragged_context_mask(anchor, stored, block_size, hidden.dtype)
        cache.begin(starts, counts)
        try:
            return self.run_layers(hidden, context, block_positions, context_positions, mask, cache)
        finally:
            cache.end()

    def _ragged_context_mask(self, context_lengths: Tensor, stored: int, block_size: int, dtype: Any) -> Any:
        """The block attends to each row's own context (its first ``context_lengths`` of ``stored``
        positions) and to the whole block."""
        batch = context_lengths.shape[0]
        device = context_lengths.device
        visible = torch.arange(stored + block_size, device=device).view(1, -1) < context_lengths.view(-1, 1)
        visible[:, stored:] = True
        if self.attention_implementation == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
                return visible[b, kv]

            return create_block_mask(
                mask_mod, batch, None, block_size, stored + block_size, device=str(device)
            )
        additive = torch.zeros(visible.shape, dtype=dtype, device=device)
        additive.masked_fill_(~visible, torch.finfo(dtype).min)
        return additive.view(batch, 1, 1, -1).expand(batch, 1, block_size, -1)

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
        context_rows: Tensor | None = None,
    ) -> BlockProposal:
        """Propose up to ``block_size`` tokens after ``anchor_tokens``, sampled serially through the
        Markov head (``prev_0 = x_s``, ``prev_k = d_{k-1}``), with their distributions ``q``.

        ``context_rows`` is :meth:`block_hidden`'s: per batch row, how many new context rows count."""
        block_size = int(self.config.block_size)
        slots = block_size if num_slots is None else int(num_slots)
        if not 1 <= slots <= block_size:
            raise ValueError(f"num_slots must lie in [1, block_size={block_size}], got {slots}")
        hidden = self.block_hidden(anchor_tokens, context_features, cache, context_rows)[:, :slots]
        if self.markov_head is not None:
            tokens, probs, logits = self.markov_head.sample_block(
                hidden,
                anchor_tokens,
                self.lm_head,
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


def _row_positions(starts: Tensor, count: int) -> Tensor:
    """``[b, count]``: ``starts[i] + 0 .. count - 1`` per row."""
    batch = starts.shape[0]
    if batch and bool((starts == starts[0]).all()):
        # One row of positions for all (the batch-1 case): the rotary tables keep their exact bits.
        first = int(starts[0])
        return torch.arange(first, first + count, device=starts.device).expand(batch, count)
    return starts.view(batch, 1) + torch.arange(count, device=starts.device)


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return drawn
