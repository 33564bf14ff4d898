"""The public surface: every name in `ndrelay.__all__` resolves, lazily loaded ones too."""

import subprocess
import sys

import ndrelay


def test_all_names_resolve():
    for name in ndrelay.__all__:
        assert getattr(ndrelay, name) is not None, name


def test_all_is_sorted_and_unique():
    assert len(set(ndrelay.__all__)) == len(ndrelay.__all__)
    assert ndrelay.__all__ == sorted(ndrelay.__all__, key=lambda n: (not n.isupper(), n))


def test_public_module_attributes_are_all_listed():
    public = {n for n in dir(ndrelay) if not n.startswith("_")}
    assert public == set(ndrelay.__all__) - {"__version__"}


def test_unknown_attribute_is_an_attribute_error():
    code = "import ndrelay\ntry:\n    ndrelay.nope\nexcept AttributeError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "nope" in out.stdout
