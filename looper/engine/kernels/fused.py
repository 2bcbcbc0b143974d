"""The model's own modules swapped for fused versions during generation, and put back afterwards.

Owns `Patched` (set attributes within a block, restore them after), the Triton RMSNorm and rotary-embedding patches
(each used only where it matches the model's own function on a test input), the torch.compile patches of a
prefill's MLPs and `MergedProjections` (an attention's q, k and v projections as one matrix product). Must never
change what a model computes beyond rounding the checks accept, and never leave a patch behind: training sees the
model as transformers built it.
"""

import functools
import logging
import sys

import torch

from looper.engine.cache import head_dim

log = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # torch.compile's backend for `generation.compile` and `sft/dpo.compile` (tests: "eager")
_ABSENT = object()


class Patched:
    """Within it, each (owner, name, value) of `patches` is set: an nn.Module's instance `forward` (nn.Module calls it
    instead of the class's), a modeling module's `apply_rotary_pos_emb` (the attention forward looks it up there at
    each call). Afterwards each name is as it was, or gone where it was not there, so training never sees them."""

    def __init__(self, patches: list):
        self.patches, self.saved = patches, []

    def __enter__(self):
        self.saved = [vars(owner).get(name, _ABSENT) for owner, name, _ in self.patches]
        for owner, name, value in self.patches:
            setattr(owner, name, value)
        return self

    def __exit__(self, *exc):
        for (owner, name, _), before in zip(self.patches, self.saved):
            if before is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, before)


def norm_patches(modules: list) -> list:
    """The RMSNorm `modules` (`fused_norms`) as one Triton kernel each. Eager forwards only: in a compiled decode
    step inductor fuses the norms itself, and a Triton kernel in it made every new slot count compile again."""
    return [
        (m, "forward", functools.partial(_triton_rms_norm, weight=m.weight, eps=m.variance_epsilon)) for m in modules
    ]


def rotary_patches(modeling: list) -> list:
    """Each of the `modeling` modules' `apply_rotary_pos_emb` (`fused_rotary`) as looper's Triton kernel where the
    call is one it handles, and as itself otherwise. Eager forwards only, as the norms."""
    return [
        (python, "apply_rotary_pos_emb", functools.partial(_triton_rotary, python.apply_rotary_pos_emb))
        for python in modeling
    ]


def compiled_patches(mlps: list, modeling: list) -> list:
    """The `mlps` and each of the `modeling` modules' `apply_rotary_pos_emb` through torch.compile (a prefill with
    `compile_decode`): inductor fuses the MLP's activation and product, and the rotary embedding's slices, negation,
    products and sum, where eager PyTorch makes a pass over the prompts' activations for each. One compilation per
    function (dynamic shapes) serves every layer and prefill size."""
    return [(m, "forward", functools.partial(_compiled(type(m).forward, COMPILE_BACKEND), m)) for m in mlps] + [
        (python, "apply_rotary_pos_emb", _compiled(python.apply_rotary_pos_emb, COMPILE_BACKEND)) for python in modeling
    ]


@functools.lru_cache(maxsize=None)
def _compiled(function, backend: str):
    return torch.compile(function, dynamic=True, backend=backend)


def compilable_parts(model) -> tuple[list, list]:
    """(the model's MLP modules, the Python modules that define its attention classes and their
    `apply_rotary_pos_emb`): what `compiled_patches` compiles. MLPs are modules of a class named *MLP whose forward
    is the class's own."""
    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP") and "forward" not in vars(m)]
    return mlps, modeling_with_rotary(model)


def modeling_with_rotary(model) -> list:
    """The Python modules that define the model's attention classes and an `apply_rotary_pos_emb` (transformers'
    modeling_llama, modeling_qwen2, ...: the attention forward looks the function up there at each call)."""
    modeling = {sys.modules.get(type(m).__module__) for m in model.modules() if type(m).__name__.endswith("Attention")}
    return [python for python in modeling if callable(getattr(python, "apply_rotary_pos_emb", None))]


def _triton_rotary(original, q, k, cos, sin, *args, **kwargs):
    """`original(q, k, cos, sin, ...)`, by `triton_rotary` where the call is its plain form: q and k
    [batch, heads, tokens, head_dim] (a power of two, the last dimension contiguous), cos/sin [batch, tokens,
    head_dim], all bfloat16."""
    plain = (
        not args
        and kwargs.get("unsqueeze_dim", 1) == 1
        and set(kwargs) <= {"unsqueeze_dim"}
        and q.dim() == k.dim() == 4
        and cos.dim() == sin.dim() == 3
        and q.stride(-1) == k.stride(-1) == 1
        and q.shape[-1] == k.shape[-1] == cos.shape[-1]
        and q.shape[-1] & (q.shape[-1] - 1) == 0
        and q.dtype == k.dtype == cos.dtype == sin.dtype == torch.bfloat16
        and q.is_cuda
    )
    if not plain:
        return original(q, k, cos, sin, *args, **kwargs)
    from looper.engine.kernels.triton_rotary import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def fused_rotary(model) -> list:
    """The modules of `modeling_with_rotary` whose `apply_rotary_pos_emb` `triton_rotary` computes exactly
    (on CUDA in bfloat16, heads of a power-of-two size, checked on a test input: a variant such as an interleaved or
    partial rotary is not). None where the kernel would never run: there `generation.compile` compiles it."""
    size = head_dim(model)
    if model.device.type != "cuda" or model.dtype != torch.bfloat16 or size & (size - 1):
        return []
    return [
        python
        for python in modeling_with_rotary(model)
        if _rotary_matches(python.apply_rotary_pos_emb, model.dtype, model.device)
    ]


@functools.lru_cache(maxsize=None)
def _rotary_matches(function, dtype: torch.dtype, device: torch.device) -> bool:
    generator = torch.Generator(device=device).manual_seed(0)
    # q and k as the attention forward makes them: a projection [batch, tokens, heads * 64] viewed per head and
    # transposed; 3 query heads (not a power of two), 2 key heads
    q = torch.randn(2, 5, 3 * 64, device=device, generator=generator).to(dtype).view(2, 5, 3, 64).transpose(1, 2)
    k = torch.randn(2, 5, 2 * 64, device=device, generator=generator).to(dtype).view(2, 5, 2, 64).transpose(1, 2)
    angles = 40 * torch.rand(2, 5, 32, device=device, generator=generator)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    try:
        with torch.no_grad():
            got, expected = _triton_rotary(function, q, k, cos, sin), function(q, k, cos, sin)
    except Exception as error:  # no Triton, an old GPU, another signature: the model's own
        log.warning("generation: Triton rotary embedding unavailable for %s here (%s)", function.__module__, error)
        return False
    if all(torch.equal(a, b) for a, b in zip(got, expected)):
        return True
    log.warning(
        "generation: Triton rotary embedding differs from %s.apply_rotary_pos_emb here; not used", function.__module__
    )
    return False


def _triton_rms_norm(hidden_states, weight, eps):
    from looper.engine.kernels.triton_norm import rms_norm

    return rms_norm(hidden_states, weight, eps)


def fused_norms(model) -> list:
    """The model's RMSNorm modules that `triton_norm` computes as they do: on CUDA in bf16/fp16, of a class
    named *RMSNorm with a weight and `variance_epsilon`, whose own forward the kernel matches on a test input (a
    variant such as Gemma's 1 + weight does not)."""
    if model.device.type != "cuda" or model.dtype not in (torch.float16, torch.bfloat16):
        return []
    candidates = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("RMSNorm")
        and "forward" not in vars(m)
        and hasattr(m, "variance_epsilon")
        and getattr(m, "weight", None) is not None
        and m.weight.dim() == 1
        and m.weight.dtype == model.dtype
    ]
    return [m for m in candidates if _norm_matches(type(m), m.weight.shape[0], m.weight.dtype, m.weight.device)]


@functools.lru_cache(maxsize=None)
def _norm_matches(cls, width: int, dtype: torch.dtype, device: torch.device) -> bool:
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        try:
            module = cls(width, eps=1e-5).to(device=device, dtype=dtype)
            module.weight.copy_(torch.rand(width, device=device, generator=generator) + 0.5)
            x = (4 * torch.randn(3, 5, width, device=device, generator=generator)).to(dtype)
            got, expected = _triton_rms_norm(x, module.weight, module.variance_epsilon), module(x)
        except Exception as error:  # no Triton, an old GPU, another constructor: the module's own
            log.warning("generation: Triton RMSNorm unavailable for %s here (%s)", cls.__name__, error)
            return False
    if got.dtype == expected.dtype and torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2):
        return True
    log.warning("generation: Triton RMSNorm differs from %s here; not used", cls.__name__)
    return False


class MergedProjections:
    """Each attention's query, key and value projections (plain `nn.Linear`s reading the same input) computed as one
    matrix product during generation: their weights (and biases) are moved into
    one matrix, each Linear's own becoming a view of its rows, and `patches` has the Linears compute that product
    once per input and return their share. One product of three times the rows reads the weights at a higher share
    of the bandwidth in a decode step than three (docs/performance.md). `restore()` gives each Linear weights of
    its own again (copies of its rows), so training and saving see the model as it was (the runner uses it on a
    GPU only). Projections under an unmerged LoRA adapter (GRPO's live policy, a quantized base's adapter) keep their
    three products: there generation computes exactly what training does (the log-probs GRPO compares, the greedy
    outputs of docs/performance.md's quantized-base table), and one product could round otherwise."""

    def __init__(self, model):
        self.groups = []
        for module in model.modules():
            linears = [_plain_linear(getattr(module, name, None)) for name in ("q_proj", "k_proj", "v_proj")]
            if None in linears or len({(x.in_features, x.weight.dtype, x.bias is None) for x in linears}) != 1:
                continue
            self.groups.append(_Merged(linears))

    @property
    def patches(self) -> list:
        return [
            (linear, "forward", functools.partial(group.forward, k))
            for group in self.groups
            for k, linear in enumerate(group.linears)
        ]

    def restore(self) -> None:
        for group in self.groups:
            group.restore()
        self.groups = []


def _plain_linear(module):
    """`module` where it is exactly `torch.nn.Linear` (not a quantized subclass, not a LoRA layer), else None."""
    return module if type(module) is torch.nn.Linear else None


class _Merged:
    """Linears of one input merged into one product (`MergedProjections`)."""

    def __init__(self, linears: list):
        self.linears, self.sizes = linears, [linear.out_features for linear in linears]
        with torch.no_grad():
            self.weight = torch.cat([linear.weight.data for linear in linears])
            self.bias = torch.cat([linear.bias.data for linear in linears]) if linears[0].bias is not None else None
        for k, linear in enumerate(linears):
            linear.weight.data = self.weight.split(self.sizes)[k]
            if self.bias is not None:
                linear.bias.data = self.bias.split(self.sizes)[k]
        self.input, self.outputs = None, None

    def forward(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Linear k's output for `x`: the merged product once per input (the first Linear called, or a new input),
        its share for each Linear after it; the last one lets the input go."""
        if k == 0 or x is not self.input:
            self.input = x
            self.outputs = torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        out = self.outputs[k]
        if k == len(self.sizes) - 1:
            self.input, self.outputs = None, None
        return out

    def restore(self) -> None:
        for linear in self.linears:
            linear.weight.data = linear.weight.data.clone()
            if linear.bias is not None:
                linear.bias.data = linear.bias.data.clone()
        self.weight = self.bias = None
