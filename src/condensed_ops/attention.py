"""``CondensedMultiheadAttention``: ``nn.MultiheadAttention`` whose q, k, v and output
projections are separate layers, condensed where they are sparse.

``nn.MultiheadAttention`` keeps its q, k and v projections in one parameter
(``in_proj_weight [3 * embed_dim, embed_dim]``) that no Linear layer owns, so
:func:`~condensed_ops.condense` swaps the whole module: each projection becomes a
:class:`~condensed_ops.CondensedLinear` (or stays an ``nn.Linear`` where it is too
dense, too small or too uneven to gain), and attention itself runs in
``F.scaled_dot_product_attention``. The forward takes ``nn.MultiheadAttention``'s
arguments and returns what it returns, so ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` use it unchanged.
"""

import math
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def attention_unsupported_reason(attention: nn.MultiheadAttention) -> Optional[str]:
    """Why ``attention`` cannot become a :class:`CondensedMultiheadAttention`, or None."""
    if type(attention) is not nn.MultiheadAttention:
        return f"a subclass ({type(attention).__name__}) may behave differently"
    if attention.bias_k is not None:
        return "add_bias_kv=True"
    if attention.add_zero_attn:
        return "add_zero_attn=True"
    return None


def attention_projections(attention: nn.MultiheadAttention) -> Dict[str, Tuple[Tensor, Optional[Tensor]]]:
    """``{q_proj, k_proj, v_proj, out_proj: (weight, bias)}``: the rows of
    ``in_proj_weight`` (or the separate ``q/k/v_proj_weight``) and ``out_proj``'s."""
    embed_dim = attention.embed_dim
    biases = [None, None, None] if attention.in_proj_bias is None else list(attention.in_proj_bias.split(embed_dim))
    if attention.in_proj_weight is not None:
        weights = list(attention.in_proj_weight.split(embed_dim))
    else:
        weights = [attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight]
    found = {name: (weight, bias) for name, weight, bias in zip(PROJECTIONS[:3], weights, biases)}
    found["out_proj"] = (attention.out_proj.weight, attention.out_proj.bias)
    return found


def projection_masks(name: str, attention: nn.MultiheadAttention, masks: Mapping[str, Tensor]) -> Dict[str, Optional[Tensor]]:
    """The masks ``masks`` holds for the projections of the attention named ``name``:
    ``<name>.in_proj_weight`` (split in three), ``<name>.q_proj_weight`` ...,
    ``<name>.out_proj`` -- the names :func:`condensed_ops.masks.sparsifiable_weights`
    and SRigL use."""
    prefix = f"{name}." if name else ""
    found: Dict[str, Optional[Tensor]] = {projection: None for projection in PROJECTIONS}
    packed = masks.get(prefix + "in_proj_weight")
    if packed is not None:
        for projection, part in zip(PROJECTIONS[:3], packed.split(attention.embed_dim)):
            found[projection] = part
    for projection in PROJECTIONS[:3]:
        separate = masks.get(f"{prefix}{projection}_weight")
        if separate is not None:
            found[projection] = separate
    found["out_proj"] = masks.get(prefix + "out_proj")
    return found


def dense_projection(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """An ``nn.Linear`` holding a copy of ``weight`` / ``bias`` (for a projection kept dense)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        linear.bias.requires_grad_(bias.requires_grad)
    return linear


class CondensedMultiheadAttention(nn.Module):
    """Multi-head attention with separate projection layers (``q_proj``, ``k_proj``,
    ``v_proj``: inputs to ``embed_dim``; ``out_proj``: ``embed_dim`` to ``embed_dim``).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False)`` behaves like
    ``nn.MultiheadAttention``'s (masks as booleans, True = not attended, or additive
    floats; ``batch_first``; unbatched inputs) and returns ``(output, weights or None)``.
    Build one with :meth:`from_multihead_attention` or :func:`~condensed_ops.condense`.
    ``add_bias_kv`` and ``add_zero_attn`` are not supported.
    """

    embed_dim: int
    num_heads: int
    head_dim: int
    dropout: float
    batch_first: bool
    # nn.TransformerEncoderLayer reads these to decide its dense fast path; with
    # no in_proj_bias it takes the regular path, which calls this module.
    _qkv_same_embed_dim: bool
    in_proj_bias: Optional[Tensor]

    def __init__(
        self,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        out_proj: nn.Module,
        num_heads: int,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        embed_dim = int(out_proj.in_features)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        for name, projection in (("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj), ("out_proj", out_proj)):
            if int(projection.out_features) != embed_dim:
                raise ValueError(f"{name} must produce embed_dim={embed_dim} features, got {projection.out_features}")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self._qkv_same_embed_dim = False
        self.in_proj_bias = None

    @classmethod
    def from_multihead_attention(
        cls,
        attention: nn.MultiheadAttention,
        masks: Optional[Mapping[str, Tensor]] = None,
        index_dtype: Optional[torch.dtype] = None,
    ) -> "CondensedMultiheadAttention":
        """Condense every projection of ``attention``, keeping ``masks`` (``{"q_proj":
        mask, ..., "out_proj": mask}``, each in its weight's shape) or, without one,
        its nonzero weights."""
        from .modules import CondensedLinear

        unsupported = attention_unsupported_reason(attention)
        if unsupported is not None:
            raise ValueError(f"CondensedMultiheadAttention.from_multihead_attention: {unsupported}")
        masks = dict(masks or {})
        projections = {
            name: CondensedLinear.from_dense(weight, bias, masks.get(name), index_dtype)
            for name, (weight, bias) in attention_projections(attention).items()
        }
        return cls.assemble(attention, projections)

    @classmethod
    def assemble(cls, attention: nn.MultiheadAttention, projections: Mapping[str, nn.Module]) -> "CondensedMultiheadAttention":
        """The module with ``attention``'s heads, dropout and layout and these projection layers."""
        module = cls(
            projections["q_proj"], projections["k_proj"], projections["v_proj"], projections["out_proj"],
            attention.num_heads, attention.dropout, attention.batch_first,
        )
        module.train(attention.training)
        return module

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target_length, source_length = query.shape[0], query.shape[1], key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim

        q = self.q_proj(query).view(batch, target_length, heads, head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, source_length, heads, head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, source_length, heads, head_dim).transpose(1, 2)

        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (nn.Transformer.generate_square_subsequent_mask makes one)"
            )
        # Like nn.MultiheadAttention: the causal hint replaces the mask only where
        # neither key padding nor the weights need it.
        use_causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if use_causal else _additive_mask(attn_mask, key_padding_mask, batch, heads, target_length, source_length, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights: Optional[Tensor] = None
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            attended = torch.matmul(weights, v)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=use_causal)
        output = self.out_proj(attended.transpose(1, 2).reshape(batch, target_length, self.embed_dim))

        if not batched:
            output = output.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return output, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"


def _additive_mask(
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    batch: int,
    heads: int,
    target_length: int,
    source_length: int,
    dtype: torch.dtype,
) -> Optional[Tensor]:
    """attn_mask (``[L, S]`` or ``[N * heads, L, S]``) and key_padding_mask (``[N, S]``),
    booleans (True = not attended) or additive floats, as one additive float mask
    broadcasting to ``[N, heads, L, S]``."""
    mask: Optional[Tensor] = None
    if attn_mask is not None:
        mask = _as_additive(attn_mask, dtype)
        mask = mask.view(1, 1, target_length, source_length) if mask.dim() == 2 else mask.view(batch, heads, target_length, source_length)
    if key_padding_mask is not None:
        padding = _as_additive(key_padding_mask, dtype).view(batch, 1, 1, source_length)
        mask = padding if mask is None else mask + padding
    return mask


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


__all__ = ["CondensedMultiheadAttention", "attention_unsupported_reason"]
