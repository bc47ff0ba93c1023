"""The method registry: lookup errors, config round trips, refusal of unknown fields and duplicates."""
from dataclasses import dataclass

import pytest

from polyquant.methods import (METHODS, MethodConfig, MethodSpec, RTNConfig, config_from_dict, get_method,
                               list_methods, register_method, unregister_method)
from polyquant.methods.rtn import rtn_quantize


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError) as e:
        get_method("no-such-method")
    msg = str(e.value)
    assert "no-such-method" in msg and "rtn" in msg
    for name in METHODS:
        assert name in msg


def test_config_round_trip():
    cfg = RTNConfig(bits=3, group_size=64, sym=False, clip_search=True, clip_grid=7, clip_min=0.6,
                    include=[r"mlp\."], exclude=["down_proj"], quantize_lm_head=True)
    d = cfg.to_dict()
    assert d["method"] == "rtn" and d["bits"] == 3 and d["include"] == [r"mlp\."]
    back = config_from_dict(d)
    assert type(back) is RTNConfig and back == cfg
    assert config_from_dict(RTNConfig().to_dict()) == RTNConfig()


def test_config_from_dict_refuses_bad_input():
    d = RTNConfig().to_dict()
    with pytest.raises(ValueError, match="bogus"):
        config_from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="method"):
        config_from_dict({k: v for k, v in d.items() if k != "method"})
    with pytest.raises(ValueError, match="unknown method"):
        config_from_dict({**d, "method": "nope"})
    with pytest.raises(ValueError, match="bits"):  # values are validated again on the way in
        config_from_dict({**d, "bits": 11})


def test_duplicate_registration_and_bad_specs():
    spec = get_method("rtn")
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec("rtn", RTNConfig, rtn_quantize, False, "integer weight-only", (4,), ("x",)))
    assert get_method("rtn") is spec

    @dataclass
    class _Cfg(MethodConfig):
        pass

    try:
        with pytest.raises(ValueError, match="family"):
            register_method(MethodSpec("_test_m", _Cfg, rtn_quantize, False, "magic", (4,), ("x",)))
        with pytest.raises(ValueError, match="format"):
            register_method(MethodSpec("_test_m", _Cfg, rtn_quantize, False, "integer weight-only", (4,), ()))
        for bad in (0.5, True, "2"):
            with pytest.raises(ValueError, match="memory_factor"):
                MethodSpec("_test_m", _Cfg, rtn_quantize, False, "integer weight-only", (4,), ("x",), memory_factor=bad)
        assert "_test_m" not in METHODS
        register_method(MethodSpec("_test_m", _Cfg, rtn_quantize, False, "integer weight-only", (4,), ("x",)))
        assert _Cfg.method == "_test_m" and _Cfg().to_dict()["method"] == "_test_m"
        assert "_test_m" in [s.name for s in list_methods()]
        with pytest.raises(ValueError, match="already registered"):
            register_method(MethodSpec("_test_m", _Cfg, rtn_quantize, False, "integer weight-only", (4,), ("x",)))
    finally:
        unregister_method("_test_m")
    assert "_test_m" not in METHODS


def test_spec_traits():
    spec = get_method("rtn")
    assert spec.default_format == spec.formats[0]
    names = [s.name for s in list_methods()]
    assert names == sorted(names)
