"""SparseAttention generating its grid chunk by chunk with a KV cache (issue 16 part 1; Note
[Generating with a cache] in attncc.nn).

A pattern causal along the grid's leading axis gives, step by step, exactly the rows of one
forward over the whole grid (the later slices are invisible to earlier queries); any other
pattern sees only the keys written so far, which the reference states as the pattern
intersected with those key lengths. fp32: 1e-5 of O(1) outputs (the same kernels on a query
region as on the whole grid; the sums differ only in their order).
"""

import pytest
import torch
from conftest import DEVICE

from attncc import AttnccError
from attncc.ir import causal, key_lengths, neighborhood
from attncc.nn import SparseAttention
from attncc.reference import attention as reference

DIM, HEADS = 32, 4


def _module(pattern, grid, **kwargs):
    torch.manual_seed(0)
    return SparseAttention(DIM, HEADS, pattern, grid, kv_heads=2, **kwargs).to(DEVICE).eval()


def test_token_by_token_decoding_is_the_whole_forward():
    module = _module(causal(), (11,))
    x = torch.randn(2, 11, DIM, device=DEVICE)
    with torch.no_grad():
        whole = module(x)
        cache = module.new_cache(2)
        steps = [module(x[:, :4], cache=cache)] + [module(x[:, i : i + 1], cache=cache) for i in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-5)
    assert cache.filled.tolist() == [11, 11]


def test_a_video_two_frames_at_a_time_is_the_whole_forward():
    module = _module(neighborhood((3, 3, 5), causal=(True, False, False)), (4, 5, 6), rel_pos_bias=True)
    x = torch.randn(1, 4, 5, 6, DIM, device=DEVICE)
    with torch.no_grad():
        whole = module(x)
        cache = module.new_cache(1)
        steps = [module(x[:, t : t + 2], cache=cache) for t in (0, 2)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-5)


def test_a_pattern_that_looks_ahead_sees_only_the_written_keys_per_batch_element():
    """A 1-D neighborhood of 5 (two keys each side), two sequences at different fill levels."""
    module = _module(neighborhood(5), (12,))
    x = torch.randn(2, 3, DIM, device=DEVICE)
    with torch.no_grad():
        cache = module.new_cache(2)
        cache.k.normal_()  # slices not written yet hold garbage: it must not be seen
        cache.v.normal_()
        cache.filled = torch.tensor([0, 6], device=DEVICE)
        got = module(x, cache=cache)
        q = module.q(x).unflatten(-1, (HEADS, DIM // HEADS))
        lengths = torch.tensor([3, 9], device=DEVICE)
        out = reference(
            q.double(), cache.k.double(), cache.v.double(), neighborhood(5) & key_lengths(), layout="spatial",
            q_offset=torch.tensor([0, 6], device=DEVICE), data={"key_lengths": lengths},
        )  # fmt: skip
        want = module.proj(out.float().flatten(-2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.filled.tolist() == [3, 9]


def test_flat_tokens_of_a_grid_step():
    module = _module(neighborhood((3, 3, 5), causal=(True, False, False)), (4, 5, 6))
    x = torch.randn(1, 4, 5, 6, DIM, device=DEVICE)
    with torch.no_grad():
        cache = module.new_cache(1)
        first = module(x[:, :1].flatten(1, 3), cache=cache)
        assert first.shape == (1, 30, DIM)
        torch.testing.assert_close(first, module(x)[:, :1].flatten(1, 3), atol=1e-5, rtol=1e-5)


def test_bad_steps_are_refused_by_name():
    module = _module(causal(), (11,))
    cache = module.new_cache(2)
    with pytest.raises(AttnccError, match=r"x.shape \(with a cache\) = \(2, 12, 32\)"):
        module(torch.zeros(2, 12, DIM, device=DEVICE), cache=cache)
    with pytest.raises(AttnccError, match=r"cache.k shape = \(1, 11, 2, 8\)"):
        module(torch.zeros(2, 1, DIM, device=DEVICE), cache=module.new_cache(1))
    own = _module(causal() & key_lengths(), (11,))
    with pytest.raises(AttnccError, match=r"pattern \(with a cache\) .* no key_lengths"):
        own(torch.zeros(2, 1, DIM, device=DEVICE), cache=own.new_cache(2))
    cache.filled = torch.tensor([11, 3], device=DEVICE)
    with pytest.raises(RuntimeError, match=r"must stay within 0\.\.11"):
        module(torch.zeros(2, 1, DIM, device=DEVICE), cache=cache)


def test_compiled_decoding_steps_never_recompile():
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    module = _module(causal(), (11,))
    step = torch.compile(lambda x, cache: module(x, cache=cache), fullgraph=True, backend=counter)
    x = torch.randn(2, 11, DIM, device=DEVICE)
    with torch.no_grad():
        whole = module(x)[:, 2:6]
        cache = module.new_cache(2)
        module(x[:, :2], cache=cache)
        steps = [step(x[:, i : i + 1], cache) for i in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1 and cache.filled.tolist() == [6, 6]
