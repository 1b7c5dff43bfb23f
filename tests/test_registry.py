"""String registry: parsing, building, errors."""

import pytest

from efficient_mllm.registry import Registry, RegistryError, parse_spec


def test_parse_spec_literals():
    name, kw = parse_spec("fastv(layer=2, keep=64, ratio=0.5, mode='last', sizes=(2, 3), flag=True, x=None)")
    assert name == "fastv"
    assert kw == {"layer": 2, "keep": 64, "ratio": 0.5, "mode": "last", "sizes": (2, 3), "flag": True, "x": None}
    assert parse_spec(" random ") == ("random", {})
    assert parse_spec("m(d={'a': [1, -2]})") == ("m", {"d": {"a": [1, -2]}})


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("fastv(2)", "positional"),
        ("fastv(layer=__import__('os'))", "not a literal"),
        ("fastv(layer=x)", "not a literal"),
        ("fastv(", "not of the form"),
        ("a.b(x=1)", "not of the form"),
        ("", "non-empty"),
        ("f(**{'a': 1})", "kwargs"),
    ],
)
def test_parse_spec_rejects(bad, msg):
    with pytest.raises(RegistryError, match=msg):
        parse_spec(bad)


def test_build_and_errors():
    reg = Registry("thing")

    @reg.register("pool", paper="Some et al. 2024")
    def pool(size=2, *, mode="avg"):
        """Pools things."""
        return ("pool", size, mode)

    assert reg.build("pool") == ("pool", 2, "avg")
    assert reg.build("pool(size=3, mode='max')") == ("pool", 3, "max")
    assert reg.build({"name": "pool", "size": 4}) == ("pool", 4, "avg")
    assert reg.build("pool(size=3)", size=5) == ("pool", 5, "avg")
    assert reg.get("pool").description == "Pools things."
    assert reg.get("pool").paper == "Some et al. 2024"
    fn = lambda: 1  # noqa: E731
    assert reg.build(fn) is fn
    with pytest.raises(RegistryError, match=r"unknown thing 'pol'.*Did you mean 'pool'.*Registered: pool"):
        reg.build("pol")
    with pytest.raises(RegistryError, match=r"unknown argument\(s\) \['sise'\].*accepts: size, mode"):
        reg.build("pool(sise=3)")
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("pool")(lambda: None)
    with pytest.raises(RegistryError, match="'name' key"):
        reg.build({"size": 3})
    assert "pool" in reg and reg.names() == ["pool"]
