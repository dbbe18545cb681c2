"""Every public function and class documents itself with a runnable example (run by --doctest-modules)."""

import inspect

import pytest

import kronsum as ks

EXEMPT = {"AccuracyWarning", "DecompositionError", "__version__"}  # exceptions and constants


@pytest.mark.parametrize("name", sorted(set(ks.__all__) - EXEMPT))
def test_public_api_has_numpydoc_with_example(name):
    doc = inspect.getdoc(getattr(ks, name)) or ""
    assert ">>>" in doc, f"kronsum.{name} has no runnable example"
    assert len(doc.splitlines()) >= 8, f"kronsum.{name} has too short a docstring"


@pytest.mark.parametrize("module", ["kronsum.adapters.torch", "kronsum.adapters.jax"])
def test_adapter_functions_have_examples(module):
    import importlib

    mod = importlib.import_module(module)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if callable(obj) and not isinstance(obj, type):
            assert ">>>" in (inspect.getdoc(obj) or ""), f"{module}.{name} has no runnable example"
