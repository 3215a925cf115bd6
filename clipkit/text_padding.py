"""Skip the text padding: a token batch cut at its longest caption gives the text tower's exact features.

Tokenizers pad every caption to the model's context length (32 or 77 tokens), while captions are often a few tokens
long; the text tower would spend most of its compute on pad tokens whose outputs are thrown away:
- open_clip's built-in tower is causal (no token attends to a later one) and pools at the end-of-text token, so the
  pad tokens after the batch's longest caption never reach a pooled feature, in the forward or the backward;
- a Hugging Face tower masks pad tokens out of attention, and its mean or CLS pooler ignores them.
Cutting the batch there (`trim_padding`, rounded up to a multiple of `PAD_MULTIPLE` so torch.compile sees a handful
of shapes) therefore gives the same features and gradients, up to float rounding. `enable_short_text` reports
whether a model qualifies, and lets open_clip's `CLIP` take the shorter input (its `encode_text` adds the whole
positional table and causal mask, so the class gains an `encode_text` that slices both).

Only pad id 0 is trimmed (open_clip's tokenizer, BERT-family Hugging Face tokenizers): the caption ids of duplicate
masking (`clipkit.losses.caption_ids_from_tokens`) ignore trailing zeros, so a caption keeps its id at any width.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

PAD_MULTIPLE = 8
PAD_ID = 0


def trimmed_length(*tokens: torch.Tensor | None, multiple: int = PAD_MULTIPLE) -> int:
    """Columns to keep: one past the last non-pad column of any of `tokens` ([..., L] id tensors of one width L),
    rounded up to `multiple`, at most L. None entries are ignored."""
    present = [t for t in tokens if t is not None]
    width = present[0].shape[-1]
    used = torch.zeros(width, dtype=torch.bool)
    for t in present:
        if t.shape[-1] != width:
            raise ValueError(f"token tensors differ in width: {t.shape[-1]} vs {width}")
        used |= (t != PAD_ID).reshape(-1, width).any(0).cpu()
    last = int(used.nonzero().max()) + 1 if used.any() else 1
    return min(width, -(-last // multiple) * multiple)


class ShortTextCLIP(open_clip.CLIP):
    """open_clip's `CLIP` whose text tower also takes fewer columns than its context length. Same parameters and
    state dict as `CLIP`; the full-width input runs open_clip's own `encode_text`."""

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        n = text.shape[1]
        if n == self.positional_embedding.shape[0]:
            return super().encode_text(text, normalize)
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype)
        x = x + self.positional_embedding[:n].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
        if self.text_projection is not None:
            proj = self.text_projection
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return F.normalize(x, dim=-1) if normalize else x


def _hf_qualifies(text: torch.nn.Module) -> bool:
    from open_clip.hf_model import ClsPooler, HFTextEncoder, MeanPooler

    return (isinstance(text, HFTextEncoder) and getattr(text.config, "pad_token_id", None) == PAD_ID
            and type(text.pooler) in (MeanPooler, ClsPooler))


def enable_short_text(net: torch.nn.Module, tokenizer) -> bool:
    """True when `net`'s text tower gives the same features for `trim_padding`'s cut batches (then it takes them);
    False leaves the model as it was. Qualifies: open_clip's `CLIP` with a causal tower pooled at the end-of-text
    token and open_clip's own tokenizer (pad id 0); a `CustomTextCLIP` with a Hugging Face tower padded with id 0
    and a mean or CLS pooler."""
    if type(net) is open_clip.CLIP:
        if (net.attn_mask is None or net.text_pool_type not in ("argmax", "eos")
                or not isinstance(tokenizer, open_clip.SimpleTokenizer)):
            return False
        net.__class__ = ShortTextCLIP
        return True
    return isinstance(net, open_clip.CustomTextCLIP) and _hf_qualifies(getattr(net, "text", None))


def trim_padding(tokens: torch.Tensor, *more: torch.Tensor | None) -> tuple:
    """(tokens, *more) cut to `trimmed_length` of all of them (None stays None)."""
    n = trimmed_length(tokens, *more)
    return tuple(t[..., :n] if t is not None else None for t in (tokens, *more))
