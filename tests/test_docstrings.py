"""The examples in the public docstrings run and print what they say."""

import doctest

import pytest

import jax_na
import jax_na.functional
import jax_na.geometry
import jax_na.tile_model


@pytest.mark.parametrize("module", [jax_na.functional, jax_na.geometry, jax_na.tile_model],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_flax_docstring_examples():
    pytest.importorskip("flax")
    import jax_na.flax

    result = doctest.testmod(jax_na.flax, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3
    assert result.failed == 0
