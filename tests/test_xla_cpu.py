"""minidiff.xla_cpu: the XLA CPU flag minidiff sets on import, and when it leaves XLA_FLAGS alone."""

import jax
import jax.numpy as jnp
import pytest

from minidiff import xla_cpu


@pytest.fixture
def fresh(monkeypatch):
    """As before JAX's backend starts, with jaxlib 0.10 installed and no XLA_FLAGS of the user's."""
    monkeypatch.setattr(xla_cpu, "_backend_started", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("MINIDIFF_XLA_DEFAULTS", raising=False)
    return monkeypatch


def test_the_flag_is_added_after_the_users_flags(fresh):
    import os

    fresh.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert xla_cpu.apply_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + xla_cpu.FLAG


@pytest.mark.parametrize("case", ["user chose", "turned off", "backend started", "old jaxlib"])
def test_xla_flags_are_left_alone(fresh, case):
    import os

    flags = "--xla_cpu_experimental_ynn_fusion_type=individual_dot" if case == "user chose" else "--xla_cpu_use_thunk_runtime=true"
    fresh.setenv("XLA_FLAGS", flags)
    if case == "turned off":
        fresh.setenv("MINIDIFF_XLA_DEFAULTS", "0")
    if case == "backend started":
        fresh.setattr(xla_cpu, "_backend_started", lambda: True)
    if case == "old jaxlib":  # it would abort on a flag it does not know
        fresh.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 8))
    assert not xla_cpu.apply_defaults()
    assert os.environ["XLA_FLAGS"] == flags


def test_this_process_compiles_products_and_convolutions_without_ynnpack():
    """conftest imports minidiff before JAX starts, as the command line does: the flag is in force."""
    if xla_cpu._jaxlib_version() < xla_cpu.FIRST_JAXLIB:
        pytest.skip("jaxlib without YNNPACK")
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    f = jax.jit(lambda a, b, x, w: (a @ b, conv(x, w)))
    hlo = f.lower(jnp.ones((64, 64)), jnp.ones((64, 64)), jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 16))).compile().as_text()
    assert "dot(" in hlo and "convolution(" in hlo
    assert "ynn_fusion" not in hlo  # JAX's default would call both through YNNPACK fusions
