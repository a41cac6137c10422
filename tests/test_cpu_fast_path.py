"""cpu_fast_path.py: dropout from 16 random bits per element, attention dropout without SDPA's float32 fallback, and
the CPU trainer taking that path with the same scores."""

import math

import torch
from conftest import make_trainer

import cpu_fast_path


def test_fast_dropout_drops_p_of_the_elements_in_every_16_bit_slot_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(1_000_000, requires_grad=True)
    y = cpu_fast_path.fast_dropout(x, 0.1)
    kept = (y != 0).float()
    # Each 64-bit draw serves four elements: all four slots must drop ~10% (a half-range draw would never drop the
    # fourth). Binomial standard deviation per slot: sqrt(0.09 / 250000) = 0.0006.
    assert kept.view(-1, 4).mean(0).sub(0.9).abs().max().item() < 0.003
    p = round(0.1 * 65536) / 65536  # p as applied: 6554 / 65536 = 0.100006
    assert torch.equal(y[y != 0], torch.full((int(kept.sum()),), 1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask)/dx = mask
    torch.manual_seed(0)
    assert torch.equal(cpu_fast_path.fast_dropout(torch.ones(1_000_000), 0.1), y.detach())  # the seed fixes the mask
    assert cpu_fast_path.fast_dropout(x, 0.1, training=False) is x and cpu_fast_path.fast_dropout(x, 0.0) is x
    assert cpu_fast_path.fast_dropout(torch.ones(8, dtype=torch.bfloat16), 0.5).dtype == torch.bfloat16


def test_cpu_attention_with_nothing_dropped_equals_sdpa_with_its_padding_mask():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False  # the second sequence has two padding tokens
    module = torch.nn.Module()  # in training mode
    # dropout 1e-6 rounds to 0 / 65536: the math path runs and drops nothing.
    ours, _ = cpu_fast_path.cpu_attention(module, query, key, value, mask, dropout=1e-6)
    reference = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)
    assert torch.allclose(ours, reference, atol=1e-6)
    torch.manual_seed(1)
    dropped, _ = cpu_fast_path.cpu_attention(module, query, key, value, mask, dropout=0.5)
    torch.manual_seed(1)
    probs = (query @ key.transpose(2, 3) / math.sqrt(8)).masked_fill(~mask, -1e30).softmax(-1)
    assert torch.allclose(dropped, (cpu_fast_path.fast_dropout(probs, 0.5) @ value).transpose(1, 2), atol=1e-6)


def test_the_cpu_trainer_takes_the_fast_path_unless_told_not_to_and_scores_the_same(minilm, tmp_path):
    fast = make_trainer(minilm, tmp_path)
    plain = make_trainer(minilm, tmp_path, ["--fast_cpu_dropout", "false"])
    dropouts = [m for m in fast.model.modules() if isinstance(m, torch.nn.Dropout)]
    # 6 layers x 3 (attention probabilities, attention output, feed-forward output), embeddings, head
    assert len(dropouts) == 20 and all(type(m) is cpu_fast_path.FastDropout for m in dropouts)
    assert fast.model.config._attn_implementation == "cpu_fast"
    assert not any(isinstance(m, cpu_fast_path.FastDropout) for m in plain.model.modules())
    assert plain.model.config._attn_implementation == "sdpa"
    batch = fast.data_collator([fast.train_dataset[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain.model.load_state_dict(fast.model.state_dict())  # the two heads were drawn at different RNG states
    with torch.no_grad():
        assert torch.allclose(fast.model.eval()(**inputs).logits, plain.model.eval()(**inputs).logits, atol=1e-6)
