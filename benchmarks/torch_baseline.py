"""The torch.compile peer of bench_gpu.py: OLMo 2 in plain torch with a static KV cache, decode as CUDA graphs.

The usual "gpt-fast style" recipe, written for OLMo 2:
  - the forward pass is ordinary torch ops over the weight tensors of a loaded HF Olmo2ForCausalLM
    (the same Parameter objects: nothing is copied);
  - the KV cache is preallocated per (batch, context) and written in place at the step's positions;
  - prefill runs eagerly (SDPA, causal, over the prompt's own K/V);
  - the single-token decode step (forward + argmax) is compiled with
    torch.compile(mode="reduce-overhead", fullgraph=True), which replays it as a CUDA graph.

OLMo 2 block (post-norm): x = x + post_attention_layernorm(attn(x)); x = x + post_feedforward_layernorm(mlp(x)).
q_norm / k_norm are RMSNorms over the whole q / k projections (all heads) before RoPE; GQA by
repeating K/V heads. RMSNorm, RoPE and the residual adds round like HF's so that the two agree to
bf16 noise; bench_gpu.py checks that before timing anything.

    base = StaticOlmo2(hf_model, compile_mode="reduce-overhead")
    tokens = base.generate(prompts, 256)          # prompts: [B, T] long tensor -> [B, 256]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Olmo2RMSNorm: normalise in float32, scale by the weight in float32, round to x's dtype once."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in float32. x: [B, heads, T, hd]; cos, sin: [T, hd] float32."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class StaticLayer(nn.Module):
    """One OLMo 2 decoder layer over borrowed HF weights and its own static K/V cache."""

    def __init__(self, hf_layer, n_heads: int, n_kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        # NOTE: assigning an existing Parameter registers that very tensor; no weight is copied.
        self.wq, self.wk, self.wv, self.wo = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight
        self.q_norm, self.k_norm = attn.q_norm.weight, attn.k_norm.weight
        self.post_attn_norm = hf_layer.post_attention_layernorm.weight
        self.w_gate, self.w_up, self.w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        self.post_ffn_norm = hf_layer.post_feedforward_layernorm.weight
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = n_heads, n_kv_heads, head_dim, eps
        self.register_buffer("k_cache", torch.empty(0), persistent=False)
        self.register_buffer("v_cache", torch.empty(0), persistent=False)

    def set_cache(self, batch: int, context: int, device, dtype) -> None:
        shape = (batch, self.n_kv_heads, context, self.head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        # x: [B, T, H]; input_pos: [T]; mask: [T, context] bool (decode) or None (prefill from position 0)
        B, T, _ = x.shape
        hd = self.head_dim
        q = rms_norm(F.linear(x, self.wq), self.q_norm, self.eps)  # [B, T, n_heads * hd]
        k = rms_norm(F.linear(x, self.wk), self.k_norm, self.eps)  # [B, T, n_kv_heads * hd]
        v = F.linear(x, self.wv)
        q = rope(q.view(B, T, self.n_heads, hd).transpose(1, 2), cos, sin)  # [B, n_heads, T, hd]
        k = rope(k.view(B, T, self.n_kv_heads, hd).transpose(1, 2), cos, sin)  # [B, n_kv_heads, T, hd]
        v = v.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        if mask is None:  # prefill of a whole prompt: causal attention over its own keys
            keys, values = k, v
        else:  # decode: the whole cache, positions past the step masked out
            keys, values = self.k_cache, self.v_cache
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * hd)
        x = x + rms_norm(F.linear(o, self.wo), self.post_attn_norm, self.eps)
        h = F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)
        return x + rms_norm(h, self.post_ffn_norm, self.eps)


class StaticOlmo2(nn.Module):
    """OLMo 2 forward over a loaded HF Olmo2ForCausalLM's weights, with a static KV cache."""

    def __init__(self, hf_model, compile_mode: str | None = "reduce-overhead") -> None:
        super().__init__()
        cfg = hf_model.config
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        m = hf_model.model
        self.embed = m.embed_tokens.weight
        self.final_norm = m.norm.weight
        self.lm_head = hf_model.lm_head.weight
        self.layers = nn.ModuleList(StaticLayer(layer, self.n_heads, self.n_kv_heads, self.head_dim, self.eps)
                                    for layer in m.layers)
        # HF's own inverse frequencies, so the rotation angles are the same float32 numbers.
        self.register_buffer("inv_freq", m.rotary_emb.inv_freq.detach().float().clone(), persistent=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.cache_shape: tuple[int, int] | None = None
        self.compile_mode = compile_mode
        self._decode = torch.compile(decode_step, mode=compile_mode, fullgraph=True) if compile_mode else decode_step

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def borrowed_weights(self, hf_model) -> bool:
        """True when every weight here is the HF model's own storage."""
        ours = {p.data_ptr() for p in self.parameters()}
        return ours <= {p.data_ptr() for p in hf_model.parameters()}

    def set_cache(self, batch: int, context: int) -> None:
        """(Re)allocate the K/V cache for `batch` sequences of up to `context` tokens."""
        if self.cache_shape == (batch, context):
            return
        for layer in self.layers:  # free the old cache before allocating the new one
            layer.k_cache = layer.v_cache = torch.empty(0, device=self.device)
        for layer in self.layers:
            layer.set_cache(batch, context, self.device, self.embed.dtype)
        pos = torch.arange(context, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(self.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [context, hd]
        self.cos, self.sin = emb.cos(), emb.sin()
        self.cache_shape = (batch, context)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor | None,
                last_only: bool) -> torch.Tensor:
        # tokens: [B, T]; input_pos: [T] -> logits [B, 1 or T, vocab]
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        if last_only:
            x = x[:, -1:]
        return F.linear(rms_norm(x, self.final_norm, self.eps), self.lm_head)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Eager forward over whole prompts from position 0; writes the cache. tokens: [B, T]."""
        T = tokens.shape[1]
        if self.cache_shape is None or self.cache_shape[0] != tokens.shape[0] or self.cache_shape[1] < T:
            raise ValueError(f"cache {self.cache_shape} cannot hold a prefill of {tuple(tokens.shape)}; call set_cache")
        return self(tokens, torch.arange(T, device=self.device), None, last_only)

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, n: int, step_logits: list | None = None) -> torch.Tensor:
        """Greedy continuation of n tokens for each prompt (no EOS stop). prompts: [B, T] -> [B, n].

        Uses the current cache when it fits (call set_cache(B, T + n) once per batch size so that the
        compiled step keeps one shape); otherwise allocates one of exactly T + n positions.
        step_logits, when given, receives the float32 logits each token was chosen from ([B, vocab] each)."""
        B, T = prompts.shape
        if self.cache_shape is None or self.cache_shape[0] != B or self.cache_shape[1] < T + n:
            self.set_cache(B, T + n)
        context = self.cache_shape[1]
        logits = self.prefill(prompts)[:, -1]
        nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
        if step_logits is not None:
            step_logits.append(logits.float().cpu())
        out = torch.empty(B, n, dtype=torch.long, device=self.device)
        out[:, :1] = nxt
        pos = torch.tensor([T], device=self.device)
        key_pos = torch.arange(context, device=self.device)
        for i in range(1, n):
            # NOTE: each call is a new CUDA-graph step; outputs of the previous replay are cloned
            # before the next one overwrites them.
            torch.compiler.cudagraph_mark_step_begin()
            nxt, logits = self._decode(self, nxt, pos, key_pos)
            nxt = nxt.clone()
            if step_logits is not None:
                step_logits.append(logits.float().cpu())
            out[:, i : i + 1] = nxt
            pos += 1
        return out


def decode_step(model: StaticOlmo2, token: torch.Tensor, pos: torch.Tensor, key_pos: torch.Tensor):
    """One decode step for every sequence: token [B, 1] at position pos [1] -> (next token [B, 1], logits [B, vocab])."""
    mask = (key_pos <= pos)[None, :]  # [1, context]
    logits = model(token, pos, mask, True)[:, -1]
    return logits.argmax(-1, keepdim=True), logits
