"""SAM's mask decoder for many box prompts on one image, with its first layer's image-side work done once.

segment_anything's `MaskDecoder` gives every prompt its own copy of the image embedding, and the first two-way
attention layer projects that copy three times (the token-to-image keys and values, the image-to-token queries)
before anything in it depends on the prompt. Those three projections of the 4,096 image tokens are about a
quarter of the decoder's work per box (docs/performance.md); here they run once per image and are broadcast to
every box. Everything else is segment_anything's own modules called in its order, so the low-resolution masks
and IoU scores equal `MaskDecoder`'s up to float rounding (tests/test_sam_decoder.py).
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
        self.token_to_image_k = _heads(to_image.k_proj(keyed), to_image.num_heads)
        self.token_to_image_v = _heads(to_image.v_proj(self.keys), to_image.num_heads)
        self.image_to_token_q = _heads(to_token.q_proj(keyed), to_token.num_heads)

    def __call__(self, sparse: torch.Tensor, multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits and IoU predictions for a batch of sparse prompt embeddings (B x N x C), as
        `MaskDecoder.forward(..., multimask_output=multimask)` returns them."""
        decoder = self.decoder
        transformer = decoder.transformer
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)

        queries, keys = self._first_layer(transformer.layers[0], tokens)
        for layer in transformer.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=self.key_pe)
        attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + self.key_pe, v=keys)
        queries = transformer.norm_final_attn(queries + attn_out)

        iou_token_out = queries[:, 0, :]
        mask_tokens_out = queries[:, 1:1 + decoder.num_mask_tokens, :]
        channels, height, width = self.size
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(-1, channels, height, width))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                               dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou = decoder.iou_prediction_head(iou_token_out)
        chosen = slice(1, None) if multimask else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]

    def _first_layer(self, layer, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TwoWayAttentionBlock.forward with skip_first_layer_pe, its image-side projections taken from __init__."""
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
        to_image = layer.cross_attn_token_to_image
        q = _heads(to_image.q_proj(queries + tokens), to_image.num_heads)
        queries = layer.norm2(queries + to_image.out_proj(_attend(q, self.token_to_image_k, self.token_to_image_v)))
        queries = layer.norm3(queries + layer.mlp(queries))
        to_token = layer.cross_attn_image_to_token
        keyed_tokens = queries + tokens
        k = _heads(to_token.k_proj(keyed_tokens), to_token.num_heads)
        v = _heads(to_token.v_proj(queries), to_token.num_heads)
        keys = layer.norm4(self.keys + to_token.out_proj(_attend(self.image_to_token_q, k, v)))
        return queries, keys


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # B x heads x N x C/heads


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything's Attention after its input projections; a batch of 1 on either side is broadcast."""
    attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1)
    out = attn @ v
    b, heads, n, c = out.shape
    return out.transpose(1, 2).reshape(b, n, heads * c)
