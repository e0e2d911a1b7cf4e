"""The helpers every command shares: a missing optional dependency as one line, CPUs to share."""

import os

import pytest

from resclip_deploy.errors import UserError, cpus, needs_extra


def test_a_missing_extra_is_one_line_with_the_install_command():
    with pytest.raises(UserError) as e:
        with needs_extra("resclip-serve --ray", "ray"):
            import resclip_no_such_module  # noqa: F401
    assert str(e.value) == ("resclip-serve --ray needs the [ray] extra (resclip_no_such_module "
                            "is missing): pip install 'resclip-deploy[ray]'")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(UserError, match=r"^resclip-export needs the torch side \(x is missing\): "
                                        r"pip install 'resclip-deploy\[export\]'$"):
        with needs_extra("resclip-export", "export"):
            raise ModuleNotFoundError("no x", name="x")
    with needs_extra("resclip-batch", "ray"):       # present: nothing happens
        import json  # noqa: F401


def test_cpus_are_shared_and_never_zero(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert (cpus(), cpus(3), cpus(32), cpus(0)) == (16, 5, 1, 16)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cpus(4) == 1
