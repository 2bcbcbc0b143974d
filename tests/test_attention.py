"""looper.engine.kernels.attention: packed sequences and decode steps give what plain masked attention gives; on a GPU,
the fast kernels (FlashAttention varlen, the Triton decode kernel) equal the sdpa paths, gradients included."""

import pytest
import torch

from looper.engine.kernels.attention import (
    DecodeStep,
    Packed,
    kernels,
    layer_shape,
    packed_attention,
    prefix_attention,
    prefix_kernel,
)

gpu = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py): the fast kernels need a GPU


def _module(heads, kv_heads):
    return type("Module", (), {"num_key_value_groups": heads // kv_heads, "is_causal": True})()


def _reference(query, key, value, allowed, scale):
    """Plain attention, one query row at a time: query [heads, q, dim], key/value [kv_heads, k, dim]."""
    group = query.shape[0] // key.shape[0]
    key, value = key.repeat_interleave(group, dim=0), value.repeat_interleave(group, dim=0)
    scores = torch.einsum("hqd,hkd->hqk", query, key) * scale
    return torch.einsum("hqk,hkd->hqd", scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1), value)


def paged(rows: torch.Tensor, page: int = 16, seed: int = 0):
    """Rows [slots, capacity, kv_heads, dim] as a paged buffer [pages * page, kv_heads, dim] with the pages shuffled,
    and its page table [slots, capacity // page]."""
    slots, capacity = rows.shape[:2]
    order = torch.randperm(slots * capacity // page, generator=torch.Generator().manual_seed(seed))
    buffer = torch.empty_like(rows).view(-1, page, *rows.shape[2:])
    buffer[order.to(rows.device)] = rows.reshape(-1, page, *rows.shape[2:])
    return buffer.view(-1, *rows.shape[2:]), order.view(slots, -1).to(device=rows.device, dtype=torch.int32)


def _decode_case(device, dtype, heads, kv_heads, dim=64, slots=5, capacity=128):
    """A decode step's query, keys and values [slots, capacity, kv_heads, dim] and lengths: the last two also paged
    (`paged`)."""
    generator = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(slots, heads, 1, dim, device=device, dtype=dtype, generator=generator)
    keys = torch.randn(slots, capacity, kv_heads, dim, device=device, dtype=dtype, generator=generator)
    values = torch.randn(slots, capacity, kv_heads, dim, device=device, dtype=dtype, generator=generator)
    lengths = torch.tensor([1, 17, 64, 100, 128][:slots], dtype=torch.int32, device=device)
    (paged_keys, table), (paged_values, _) = paged(keys), paged(values)
    module = _module(heads, kv_heads)
    return module, query, keys, values, lengths, paged_keys, paged_values, table


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_decode_step_reads_each_slot_up_to_its_own_length_through_its_page_table(kv_heads):
    module, query, keys, values, lengths, paged_keys, paged_values, table = _decode_case(
        "cpu", torch.float32, 4, kv_heads
    )
    output = DecodeStep("sdpa", lengths, 128, table, 16).attend(module, query, paged_keys, paged_values, 0.125)[0]
    for s, n in enumerate(lengths.tolist()):
        k = keys[s, :n].repeat_interleave(4 // kv_heads, dim=1)  # [n, heads, dim]
        weights = (torch.einsum("hd,nhd->hn", query[s, :, 0], k) * 0.125).softmax(dim=-1)
        expected = torch.einsum("hn,nhd->hd", weights, values[s, :n].repeat_interleave(4 // kv_heads, dim=1))
        assert torch.allclose(output[s, 0], expected, atol=1e-5)


@gpu
@pytest.mark.parametrize("kv_heads,dim", [(8, 64), (2, 64)])
def test_gpu_decode_kernels_equal_the_masked_sdpa_step(kv_heads, dim):
    assert kernels(torch.device("cuda"), torch.bfloat16, 8, kv_heads, dim) == ("flash", "triton")
    module, query, _, _, lengths, keys, values, table = _decode_case("cuda", torch.bfloat16, 8, kv_heads, dim=dim)
    slow = DecodeStep("sdpa", lengths, 128, table, 16).attend(module, query, keys, values, 0.125)[0]
    for kernel in ("triton", "flash"):
        fast = DecodeStep(kernel, lengths, 128, table, 16).attend(module, query, keys, values, 0.125)[0]
        assert torch.allclose(fast.float(), slow.float(), atol=1e-2), kernel


def _packed_case(device, dtype, heads=4, kv_heads=2, dim=64, lengths=(1, 9, 30, 24)):
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = sum(lengths)
    query = torch.randn(1, heads, tokens, dim, device=device, dtype=dtype, generator=generator)
    key = torch.randn(1, kv_heads, tokens, dim, device=device, dtype=dtype, generator=generator)
    value = torch.randn(1, kv_heads, tokens, dim, device=device, dtype=dtype, generator=generator)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return query, key, value, starts


def test_packed_sequences_attend_causally_within_themselves_only():
    query, key, value, starts = _packed_case("cpu", torch.float32)
    output = packed_attention(_module(4, 2), query, key, value, starts, 30, 0.125, "sdpa")[0]  # [1, tokens, h, d]
    position = torch.arange(starts[-1])
    sequence = torch.bucketize(position, starts[1:], right=True)
    allowed = (sequence[:, None] == sequence[None, :]) & (position[:, None] >= position[None, :])
    expected = _reference(query[0], key[0], value[0], allowed, 0.125)  # [heads, tokens, dim]
    assert torch.allclose(output[0].transpose(0, 1), expected, atol=1e-5)


@gpu
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flash_packed_attention_equals_sdpa_with_gradients_on_a_gpu(kv_heads):
    assert kernels(torch.device("cuda"), torch.bfloat16, 4, kv_heads, 64)[0] == "flash"
    results = {}
    for kernel in ("flash", "sdpa"):
        query, key, value, starts = (
            t.requires_grad_(t.is_floating_point()) for t in _packed_case("cuda", torch.bfloat16, kv_heads=kv_heads)
        )
        output = packed_attention(_module(4, kv_heads), query, key, value, starts, 30, 0.125, kernel)[0]
        output.float().square().sum().backward()
        results[kernel] = [output, query.grad, key.grad, value.grad]
    for fast, slow in zip(results["flash"], results["sdpa"]):
        assert torch.allclose(fast.float(), slow.float(), atol=5e-2, rtol=2e-2)


def _prefix_case(device, dtype, heads, kv_heads, dim=64):
    """Three sequences whose entries sit at positions 0.., 256.. and 256.. of a cache [512, kv_heads, dim] (a prefix
    and a prompt after it read the same entries): 1 of 1, 40 of 100 and 30 of 31 queries."""
    generator = torch.Generator(device=device).manual_seed(0)
    keys = torch.randn(512, kv_heads, dim, device=device, dtype=dtype, generator=generator)
    values = torch.randn(512, kv_heads, dim, device=device, dtype=dtype, generator=generator)
    query = torch.randn(1, heads, 71, dim, device=device, dtype=dtype, generator=generator)
    starts = torch.tensor([0, 1, 41, 71], dtype=torch.int32, device=device)
    firsts, used = [0, 256, 256], [1, 100, 31]
    history = torch.cat([torch.arange(n) + first for first, n in zip(firsts, used)]).to(device)
    return _module(heads, kv_heads), query, keys, values, starts, firsts, history, used


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_rest_of_a_prompt_attends_to_its_prefix_in_the_cache(kv_heads):
    module, query, keys, values, starts, firsts, history, used = _prefix_case("cpu", torch.float32, 4, kv_heads)
    output = prefix_attention(module, query, keys, values, Packed("sdpa", starts, 40, history, used), 0.125)[0]
    bounds = starts.tolist()
    for first, n, a, b in zip(firsts, used, bounds[:-1], bounds[1:]):
        q = b - a
        allowed = torch.arange(n)[None, :] <= torch.arange(q)[:, None] + (n - q)  # query t is at position n - q + t
        expected = _reference(
            query[0, :, a:b],
            keys[first : first + n].transpose(0, 1),
            values[first : first + n].transpose(0, 1),
            allowed,
            0.125,
        )
        assert torch.allclose(output[0, a:b].transpose(0, 1), expected, atol=1e-5)


def test_a_prefill_computes_its_key_offsets_once_not_in_every_layer():
    """The cumulative key lengths the flash kernel reads are made with the prefill's arguments (one copy to the
    device, without waiting), not by each layer's attention call."""
    starts = torch.tensor([0, 1, 41, 71], dtype=torch.int32)
    packing = Packed("sdpa", starts, 40, torch.arange(132), [1, 100, 31])
    assert packing.key_starts.dtype == torch.int32
    assert packing.key_starts.tolist() == [0, 1, 101, 132]
    assert Packed("sdpa", starts, 40).key_starts is None  # (no prefix: no key offsets)


def test_the_packed_kernel_is_chosen_by_the_layer_config_where_the_layer_has_one():
    """Heads, KV heads and head size come from the layer's config (Python ints even where torch.compile traces the
    tensors' shapes symbolically), else from the query and key."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2)
    layer = type("Layer", (), {"config": config})()
    query, key = torch.zeros(1, 3, 5, 7), torch.zeros(1, 1, 5, 7)  # (shapes that disagree: the config wins)
    assert layer_shape(layer, query, key) == (8, 2, 8)
    assert layer_shape(_module(4, 2), query, key) == (3, 1, 7)


@gpu
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_gpu_flash_attention_after_a_shared_prefix_equals_sdpa(kv_heads):
    assert prefix_kernel(torch.device("cuda"), torch.bfloat16, 8, kv_heads, 64) == "flash"
    module, query, keys, values, starts, _, history, used = _prefix_case("cuda", torch.bfloat16, 8, kv_heads)
    slow = prefix_attention(module, query, keys, values, Packed("sdpa", starts, 40, history, used), 0.125)[0]
    fast = prefix_attention(module, query, keys, values, Packed("flash", starts, 40, history, used), 0.125)[0]
    assert (fast.float() - slow.float()).abs().max().item() < 2e-2
