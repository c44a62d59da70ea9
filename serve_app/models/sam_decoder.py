"""SAM's mask decoder for many box prompts on one image: the same function as segment_anything's `MaskDecoder`,
computed with less work per box.

Per box, `MaskDecoder` projects its 4,096 image tokens (256 channels) into queries, keys, values and back, eight
times over the two-way transformer: that, and the output up-scaling, is the decoder's cost. Two identities cut it,
both exact up to float rounding (tests/test_sam_decoder.py):

- **The first layer's image side is shared.** Until the first layer's image-to-token attention, nothing on the
  image side depends on the box (every box prompt has the same dense `no_mask_embed`), so its three image-side
  projections run once per image and are broadcast to every box.
- **Cross-attention runs in token space.** A box prompt has only 7 tokens (IoU, 4 mask tokens, 2 corners), 56 with
  SAM's 8 heads, against 128 projected channels. A score q·(W x + b) equals (Wᵀq)·x plus a term that is constant
  along the softmax axis when the image is on the key side, and an attention-weighted sum of projected values
  is the projection of the weighted sum of inputs. So each image-token projection (4,096 × 256 → 128) becomes a
  product with the 56 token-side vectors (4,096 × 256 × 56), and the image-to-token output projection folds
  into the values the same way. The last attention runs only for the tokens the answer reads (the IoU token and
  the mask tokens returned).
"""

from __future__ import annotations

import math

import torch


class SharedImageDecoder:
    """Decodes batches of box prompts against one image embedding. Only for prompts without a mask input: their
    dense prompt embedding is the same `no_mask_embed` for every box, which is what makes the image side shared."""

    def __init__(self, mask_decoder, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                 dense_embedding: torch.Tensor):
        self.decoder = mask_decoder
        transformer = mask_decoder.transformer
        first = transformer.layers[0]
        if not first.skip_first_layer_pe or image_embedding.shape[0] != 1 or dense_embedding.shape[0] != 1:
            raise ValueError("SharedImageDecoder needs SAM's two-way transformer and one image")
        self.size = image_embedding.shape[1:]
        self.keys = (image_embedding + dense_embedding).flatten(2).permute(0, 2, 1)  # 1 x HW x C
        self.key_pe = image_pe.flatten(2).permute(0, 2, 1)
        keyed = self.keys + self.key_pe
        to_image, to_token = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        self.token_to_image_k = _heads(to_image.k_proj(keyed), to_image.num_heads)[0]  # h x HW x d
        self.token_to_image_v = _heads(to_image.v_proj(self.keys), to_image.num_heads)[0]
        self.image_to_token_q = _heads(to_token.q_proj(keyed), to_token.num_heads)[0]

    def __call__(self, sparse: torch.Tensor, multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits and IoU predictions for a batch of sparse prompt embeddings (B x N x C), as
        `MaskDecoder.forward(..., multimask_output=multimask)` returns them."""
        decoder = self.decoder
        transformer = decoder.transformer
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)

        queries, keys = self._first_layer(transformer.layers[0], tokens)
        for layer in transformer.layers[1:]:
            queries, keys = self._layer(layer, queries, keys, tokens)

        chosen = list(range(1, decoder.num_mask_tokens)) if multimask else [0]  # the mask tokens returned
        read = [0] + [1 + i for i in chosen]  # the IoU token and those: the only tokens the answer reads
        queries, tokens = queries[:, read], tokens[:, read]
        attn_out = _token_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + self.key_pe, keys)
        queries = transformer.norm_final_attn(queries + attn_out)

        upscaled = _upscale(decoder.output_upscaling, keys, self.size)  # B x h x w x c
        hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + n]) for n, i in enumerate(chosen)],
                               dim=1)
        b, h, w, c = upscaled.shape
        masks = (upscaled.reshape(b, h * w, c) @ hyper_in.transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
        iou = decoder.iou_prediction_head(queries[:, 0])
        return masks, iou[:, chosen]

    def _first_layer(self, layer, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TwoWayAttentionBlock.forward with skip_first_layer_pe, its image-side projections taken from __init__.
        The boxes' tokens are stacked per head (heads x boxes*tokens) against the one image's keys, so that no
        product broadcasts (copies) the image side to every box."""
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
        to_image = layer.cross_attn_token_to_image
        q = _stacked(to_image.q_proj(queries + tokens), to_image.num_heads)  # h x Bn x d
        attn = torch.softmax(q / math.sqrt(q.shape[-1]) @ self.token_to_image_k.transpose(-2, -1), dim=-1)
        out = _unstacked(attn @ self.token_to_image_v, tokens.shape[0])  # B x n x h*d
        queries = layer.norm2(queries + to_image.out_proj(out))
        queries = layer.norm3(queries + layer.mlp(queries))
        to_token = layer.cross_attn_image_to_token
        k = _stacked(to_token.k_proj(queries + tokens), to_token.num_heads)  # h x Bn x d
        scores = k / math.sqrt(k.shape[-1]) @ self.image_to_token_q.transpose(-2, -1)  # h x Bn x HW
        heads, _, pixels = scores.shape
        b, n = tokens.shape[:2]
        # softmax over each head's tokens, a strided axis of 7 (7 contiguous floats per row is far slower)
        attn = torch.softmax(scores.view(heads, b, n, pixels), dim=2).transpose(0, 1).reshape(b, heads * n, pixels)
        keys = layer.norm4(_add_output_through_values(to_token, self.keys, attn, queries))
        return queries, keys

    def _layer(self, layer, queries: torch.Tensor, keys: torch.Tensor,
               tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TwoWayAttentionBlock.forward (positional encodings added), cross-attention in token space."""
        q = queries + tokens
        queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
        keyed = keys + self.key_pe
        queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, queries + tokens, keyed, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(_add_image_to_token(layer.cross_attn_image_to_token, keys, keyed, queries + tokens, queries))
        return queries, keys


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # B x heads x N x C/heads


def _stacked(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """B x n x h*d -> h x B*n x d"""
    b, n, c = x.shape
    return x.reshape(b * n, num_heads, c // num_heads).transpose(0, 1)


def _unstacked(x: torch.Tensor, b: int) -> torch.Tensor:
    """h x B*n x d -> B x n x h*d"""
    heads, bn, d = x.shape
    return x.transpose(0, 1).reshape(b, bn // b, heads * d)


def _recombine(x: torch.Tensor) -> torch.Tensor:
    b, heads, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * c)


def _per_head(linear: torch.nn.Linear, heads: int) -> torch.Tensor:
    """A projection's weight (heads*d x C) as heads x d x C."""
    out_features, in_features = linear.weight.shape
    return linear.weight.view(heads, out_features // heads, in_features)


def _token_to_image(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`Attention(q=tokens, k=image, v=image)` without projecting the image: the scores are (W_kᵀ q)·x (k_proj's
    bias adds the same to every score of a row, which softmax ignores), and the values' projection is applied
    to the attention-weighted sum of the inputs (the weights sum to 1, so the bias passes through)."""
    heads = attention.num_heads
    q = _heads(attention.q_proj(q), heads)  # B x h x n x d
    b, _, n, d = q.shape
    u = torch.einsum("bhnd,hdc->bhnc", q / math.sqrt(d), _per_head(attention.k_proj, heads)).reshape(b, heads * n, -1)
    attn = torch.softmax(u @ k.transpose(1, 2), dim=-1)  # B x hn x HW
    z = (attn @ v).view(b, heads, n, -1)  # B x h x n x C
    out = torch.einsum("bhnc,hdc->bhnd", z, _per_head(attention.v_proj, heads))
    if attention.v_proj.bias is not None:
        out = out + attention.v_proj.bias.view(1, heads, 1, d)
    return attention.out_proj(_recombine(out))


def _add_image_to_token(attention, residual: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor) -> torch.Tensor:
    """residual + `Attention(q=image, k=tokens, v=tokens)` without projecting the image: the scores are
    x·(W_qᵀ k) + b_q·k, and the output projection folds into the values."""
    heads = attention.num_heads
    k = _heads(attention.k_proj(k), heads)  # B x h x n x d
    b, _, n, d = k.shape
    k = k / math.sqrt(d)
    w = torch.einsum("bhnd,hdc->bhnc", k, _per_head(attention.q_proj, heads)).reshape(b, heads * n, -1)
    if attention.q_proj.bias is None:
        scores = w @ q.transpose(1, 2)
    else:
        shift = torch.einsum("bhnd,hd->bhn", k, attention.q_proj.bias.view(heads, d)).reshape(b, heads * n, 1)
        scores = torch.baddbmm(shift, w, q.transpose(1, 2))  # B x hn x HW
    attn = torch.softmax(scores.view(b, heads, n, -1), dim=2).view(b, heads * n, -1)  # over each head's tokens
    return _add_output_through_values(attention, residual, attn, v)


def _add_output_through_values(attention, residual: torch.Tensor, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """residual + out_proj(recombined heads of attnᵀ @ v_proj(v)) for image-side queries, as one
    residual + attnᵀ @ (each head's values through its slice of out_proj). attn is B x (heads*tokens) x HW,
    head-major, each head's weights summing to 1 over its tokens: so out_proj's bias, split evenly over the
    heads, rides in the values and the whole sum is one batched matrix product."""
    heads = attention.num_heads
    values = _heads(attention.v_proj(v), heads)  # B x h x n x d
    b, _, n, d = values.shape
    out_weight = attention.out_proj.weight  # C x h*d
    folded = torch.einsum("bhnd,chd->bhnc", values, out_weight.view(-1, heads, d))
    if attention.out_proj.bias is not None:
        folded = folded + attention.out_proj.bias / heads
    return torch.baddbmm(residual, attn.transpose(1, 2), folded.reshape(b, heads * n, -1))


def _upscale(upscaling, keys: torch.Tensor, size) -> torch.Tensor:
    """`MaskDecoder.output_upscaling` on B x HW x C image tokens, channels last (B x h x w x c out). The tokens
    already are a channels-last image, so nothing is transposed, and the LayerNorm2d between the two transposed
    convolutions runs as one layer norm over contiguous channels instead of seven passes over the whole tensor."""
    from segment_anything.modeling.common import LayerNorm2d

    channels, height, width = size
    image = keys.reshape(-1, height, width, channels).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
    layers = list(upscaling)
    if len(layers) != 5 or not isinstance(layers[1], LayerNorm2d):
        return upscaling(image.contiguous()).permute(0, 2, 3, 1)  # another architecture: run it as it is
    first, norm, activation, second, last_activation = layers
    x = first(image).permute(0, 2, 3, 1)
    x = activation(torch.nn.functional.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
    x = second(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return last_activation(x)
