"""looper's Triton kernels (decode attention, sampling) give what their PyTorch references give. On the CPU they run
through Triton's interpreter (`TRITON_INTERPRET=1`, in a subprocess: the interpreter is chosen when a kernel is
defined); on a GPU, compiled."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

gpu = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py): compiled Triton kernels need a GPU
# on a GPU machine the kernels are tested compiled (here and in test_attention.py); the interpreter of Triton 3.6
# (PyTorch 2.11's) cannot run their loops over a run-time bound, 3.9's can
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="tested compiled on a GPU")


def _interpreted(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


SAMPLING_CASE = """
    import torch
    from looper.engine.sampling import _torch_choice, hash32
    from looper.engine.kernels.triton_sampling import seeded_choice

    generator = torch.Generator().manual_seed(0)
    rows, vocab = 32, 1000
    logits = 3 * torch.randn(rows, vocab, generator=generator)
    logits[5, 7] = logits[5, 9] = 40.0  # a tie at the top: the first index wins, as in torch.argmax
    temperatures = torch.tensor([0.0, 0.6, 1.0, 1.3] * (rows // 4))
    top_ps = torch.tensor([0.95, 1.0, 0.9, 0.5, 0.2, 0.99, 1.0, 0.8] * (rows // 8))
    keys = hash32(torch.arange(rows) * 7919)
    for nucleus in (True, False):
        expected = _torch_choice(logits, keys, temperatures, top_ps, nucleus)
        for block in (256, 1024):  # several chunks a row / one chunk
            got = seeded_choice(logits, keys, temperatures, top_ps, nucleus, block=block)
            print(nucleus, block, (got == expected).sum().item(), rows)
"""


@pytest.mark.slow
@interpreted
def test_the_sampling_kernel_picks_what_pytorch_picks_interpreted():
    lines = _interpreted(SAMPLING_CASE).split()
    results = [lines[i : i + 4] for i in range(0, len(lines), 4)]
    assert len(results) == 4
    assert all(same == rows for _, _, same, rows in results), results


@pytest.mark.slow
@interpreted
def test_the_decode_attention_kernel_reads_each_row_up_to_its_length_through_its_pages_interpreted():
    out = _interpreted("""
        import torch
        from looper.engine.kernels.attention import DecodeStep
        from looper.engine.kernels.triton_decode import decode_attention

        generator = torch.Generator().manual_seed(0)
        slots, heads, kv_heads, dim, capacity, page = 4, 4, 2, 16, 80, 8
        query = torch.randn(slots, heads, 1, dim, generator=generator)
        keys = torch.randn(slots * capacity, kv_heads, dim, generator=generator)  # 40 pages of 8, in any order
        values = torch.randn(slots * capacity, kv_heads, dim, generator=generator)
        table = torch.randperm(slots * capacity // page, generator=generator).view(slots, -1).to(torch.int32)
        lengths = torch.tensor([1, 16, 17, 80], dtype=torch.int32)
        module = type("Module", (), {"num_key_value_groups": heads // kv_heads, "is_causal": True})()
        step = DecodeStep("sdpa", lengths, capacity, table, page)
        expected = step.attend(module, query, keys, values, 0.25)[0][:, 0]
        got = decode_attention(query[:, :, 0], keys, values, lengths, table, page, 0.25, block_n=16)
        print((got - expected).abs().max().item())
    """)
    assert float(out) < 1e-4


@pytest.mark.slow
@interpreted
def test_the_rms_norm_kernel_computes_llamas_norm_interpreted():
    out = _interpreted("""
        import torch
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from looper.engine.kernels.triton_norm import rms_norm

        generator = torch.Generator().manual_seed(0)
        for width in (48, 64):  # a width that is not a power of two, one that is
            module = LlamaRMSNorm(width, eps=1e-5)
            module.weight.data = torch.rand(width, generator=generator) + 0.5
            x = 3 * torch.randn(2, 7, width, generator=generator)
            print((rms_norm(x, module.weight, 1e-5) - module(x)).abs().max().item())
            columns = (3 * torch.randn(width, 14, generator=generator)).t()  # rows that are not contiguous
            print((rms_norm(columns, module.weight, 1e-5) - module(columns)).abs().max().item())
    """)
    assert all(float(error) < 1e-5 for error in out.split()), out


@gpu
def test_gpu_generation_runs_llamas_norms_as_one_kernel_and_restores_them():
    from transformers import LlamaConfig, LlamaForCausalLM

    from looper.engine.kernels.fused import Patched, fused_norms, norm_patches

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
    )
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 100, (2, 9), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits
        with Patched(norm_patches(fused_norms(model))) as fused:
            assert len(fused.patches) == 2 * 2 + 1
            fast = model.model.norm(model.model.embed_tokens(ids))
        assert not any("forward" in vars(m) for m in model.modules())
        assert torch.allclose(fast.float(), model.model.norm(model.model.embed_tokens(ids)).float(), atol=2e-2)
        assert torch.equal(model(ids).logits, expected)


@gpu
def test_gpu_sampling_uses_the_kernel_and_agrees_with_pytorch():
    from looper.engine.kernels.triton_sampling import seeded_choice
    from looper.engine.sampling import _torch_choice, _triton_sampler, hash32

    assert _triton_sampler(torch.device("cuda", torch.cuda.current_device()))
    generator = torch.Generator(device="cuda").manual_seed(1)
    rows = 256
    logits = torch.randn(rows, 32000, device="cuda", generator=generator).to(torch.bfloat16)
    temperatures = torch.tensor([0.0, 0.7, 1.0, 1.2] * (rows // 4), device="cuda")
    top_ps = torch.tensor([0.95, 0.9, 1.0, 0.5] * (rows // 4), device="cuda")
    keys = hash32(torch.arange(rows, device="cuda"))
    same = seeded_choice(logits, keys, temperatures, top_ps, True) == _torch_choice(
        logits, keys, temperatures, top_ps, True
    )
    assert same[temperatures <= 0].all() and same.sum() >= rows - 3


def rotary_case(device: str) -> list[tuple]:
    """For a prefill, a decode step and cos/sin broadcast over the batch, in bfloat16, for q and k: whether looper's
    rotary kernel gives Llama's `apply_rotary_pos_emb` bit for bit and token-major underneath."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from looper.engine.kernels.triton_rotary import apply_rotary_pos_emb as triton_rotary

    generator, results = torch.Generator(device).manual_seed(0), []
    for dtype in (torch.bfloat16,):
        for batch, cos_batch, tokens in ((1, 1, 9), (4, 4, 1), (3, 1, 2), (2, 2, 40)):
            # q and k as the attention forward makes them: a projection viewed per head and transposed
            q = torch.randn(batch, tokens, 3 * 16, generator=generator, device=device).to(dtype)
            k = torch.randn(batch, tokens, 2 * 16, generator=generator, device=device).to(dtype)
            q, k = q.view(batch, tokens, 3, 16).transpose(1, 2), k.view(batch, tokens, 2, 16).transpose(1, 2)
            angles = 50 * torch.rand(cos_batch, tokens, 8, generator=generator, device=device)
            cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
            for a, b in zip(triton_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
                results.append(a.shape == b.shape and torch.equal(a, b) and a.transpose(1, 2).is_contiguous())
    return results


@pytest.mark.slow
@interpreted
def test_the_rotary_kernel_equals_llamas_rotary_embedding_bit_for_bit_interpreted():
    out = _interpreted("from tests.test_triton_kernels import rotary_case; print(rotary_case('cpu'))")
    assert out.strip() == str([True] * 8), out


@gpu
def test_gpu_rotary_kernel_equals_llamas_and_generation_patches_and_restores_it():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from looper.engine.kernels.fused import Patched, fused_rotary, rotary_patches

    assert rotary_case("cuda") == [True] * 8  # bit for bit
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    original = modeling_llama.apply_rotary_pos_emb
    ids = torch.randint(0, 100, (2, 9), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits
        assert fused_rotary(model) == [modeling_llama]
        with Patched(rotary_patches(fused_rotary(model))):
            assert modeling_llama.apply_rotary_pos_emb is not original
            assert torch.allclose(model(ids).logits.float(), expected.float(), atol=2e-2)
        assert modeling_llama.apply_rotary_pos_emb is original
    # heads of 24: the kernel would never run, so it is not patched in (generation.compile compiles the function)
    config = LlamaConfig(
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    assert fused_rotary(LlamaForCausalLM(config).to("cuda", torch.bfloat16)) == []
