"""The sympy closed forms, printed as code, give exactly the brute-force keys."""

import random
import re

import pytest
import sympy

from attncc.ir import Grid, neighborhood
from attncc.ir.mask import mask
from attncc.ir.symbolic import neighborhood_progression, to_code

L_, W_, D_, S_ = (sympy.Symbol(name, integer=True, positive=True) for name in ("L", "W", "D", "S"))
SINGLE_SLASH = re.compile(r"(?<!/)/(?!/)")


def _mask_rows(length, window, dilation, stride, causal_):
    m = mask(neighborhood(window, dilation, stride, causal_), Grid((length,)))[0]
    return [row.nonzero().flatten().tolist() for row in m]


def _random_cases(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.randint(1, 40)
        window = rng.randint(1, length)
        dilation = rng.randint(1, length // window)
        stride = rng.randint(1, window)
        yield length, window, dilation, stride, rng.random() < 0.5


@pytest.mark.parametrize("causal_", [False, True], ids=["non-causal", "causal"])
def test_symbolic_code_matches_mask(causal_):
    prog = neighborhood_progression(L_, W_, D_, S_, causal_)
    code = {name: to_code(getattr(prog, name)) for name in ("first", "last", "step")}
    for text in code.values():
        assert not SINGLE_SLASH.search(text), text
    fns = {
        name: eval(f"lambda q, L, W, D, S: {text}", {"min": min, "max": max}) for name, text in code.items()
    }
    cases = [c for c in _random_cases(400, seed=7 + causal_) if c[4] == causal_]
    assert len(cases) > 150
    for length, window, dilation, stride, _ in cases:
        rows = _mask_rows(length, window, dilation, stride, causal_)
        for qv, keys in enumerate(rows):
            args = (qv, length, window, dilation, stride)
            first, last, step = (fns[name](*args) for name in ("first", "last", "step"))
            assert all(isinstance(v, int) for v in (first, last, step))
            assert (first, last) == (keys[0], keys[-1]), (length, window, dilation, stride, qv)
            assert list(range(first, last + 1, step)) == keys, (length, window, dilation, stride, qv)


def test_specialised_code_matches_mask():
    """Numbers substituted into the symbolic form, then printed, evaluated with Python ints."""
    for length, window, dilation, stride, causal_ in _random_cases(200, seed=11):
        general = neighborhood_progression(L_, W_, D_, S_, causal_)
        values = {L_: length, W_: window, D_: dilation, S_: stride}
        direct = neighborhood_progression(length, window, dilation, stride, causal_)
        rows = _mask_rows(length, window, dilation, stride, causal_)
        for prog in (direct, general):
            texts = [to_code(sympy.sympify(getattr(prog, n)).subs(values)) for n in ("first", "last", "step")]
            for text in texts:
                assert not SINGLE_SLASH.search(text), text
            fns = [eval(f"lambda q: {t}", {"min": min, "max": max}) for t in texts]
            for qv, keys in enumerate(rows):
                first, last, step = (f(qv) for f in fns)
                assert (first, last) == (keys[0], keys[-1]), (
                    length,
                    window,
                    dilation,
                    stride,
                    causal_,
                    qv,
                    texts,
                )
                assert list(range(first, last + 1, step)) == keys


def test_to_code_numpy_dialect_has_no_true_division():
    prog = neighborhood_progression(L_, W_, D_, S_, False)
    for name in ("first", "last", "step"):
        text = to_code(getattr(prog, name), numpy=True)
        assert not SINGLE_SLASH.search(text)
        assert "min(" not in text.replace("minimum(", "") and "max(" not in text.replace("maximum(", "")
