"""Read this only when training or reranking on a CPU is slow: nothing here runs on a GPU.

On the CPU, torch draws each dropout mask element through a Bernoulli from its Mersenne Twister (a quarter of a bf16
training step here), SDPA with attention dropout falls back to float32 math, and glibc hands large freed buffers
back to the OS after every step. train.py swaps in the cheaper dropout and attention below (use_cpu_fast_path), and
both scripts keep freed memory (keep_freed_memory). docs/design-notes.md has the measurements.
"""

import ctypes
import functools

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask


class _FastDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        # One 64-bit draw serves four elements: each is dropped when its 16 bits fall below p * 2^16.
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n]
        dropped = round(p * 2**16)
        mask = (bits.view(x.shape) >= dropped - 2**15).to(x.dtype).mul_(2**16 / (2**16 - dropped))
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fast_dropout(x, p, training=True):
    """F.dropout with p rounded to 1/65536, from a quarter of the generator's draws (CPU tensors)."""
    return _FastDropout.apply(x, p) if training and p > 0 else x


class FastDropout(nn.Dropout):
    def forward(self, x):
        return fast_dropout(x, self.p, self.training)


def cpu_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA, but training with attention dropout runs the same math in the compute dtype, with fast_dropout."""
    if not (module.training and dropout > 0) or getattr(module, "is_causal", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # sdpa_mask's: True = attend
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = fast_dropout(scores.softmax(-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_cpu_fast_path(model):
    """Swap the model's dropouts for FastDropout and its attention for cpu_attention (weights and outputs alike)."""
    AttentionInterface.register("cpu_fast", cpu_attention)  # registered on first use, not on import
    AttentionMaskInterface.register("cpu_fast", sdpa_mask)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p))
    model.set_attn_implementation("cpu_fast")


@functools.cache  # once per process
def keep_freed_memory():
    """On the CPU (Linux, glibc): keep freed memory in the process instead of handing it back to the OS, which made
    every training step or forward pass page-fault its large buffers anew. The price: the process keeps its peak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
