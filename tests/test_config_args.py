"""The keyword argument of the config files (``--config=configs/oacir.py:paper,fixed_beta=0.5``)."""

import pytest

from configs import idmr, oacir
from idmr_jax.config_args import parse_config_args


def test_keywords_values_and_bare_flags():
    assert parse_config_args("paper, fixed_beta=0.5,,tiny", {"paper", "fixed_beta", "tiny"}) == {
        "paper": "1", "fixed_beta": "0.5", "tiny": "1"}
    assert parse_config_args(None, {"tiny"}) == {} and parse_config_args("", ()) == {}


def test_unknown_keywords_are_refused_by_both_configs():
    with pytest.raises(ValueError, match=r"unknown config keywords \['tinny'\]; known: \["):
        oacir.get_config("tinny")
    with pytest.raises(ValueError, match=r"unknown config keywords \['lamra2'\]; known: \['backbone', 'demo', 'fake'"):
        idmr.get_config("lamra2,tiny")
    with pytest.raises(ValueError, match="backbone=llava2: use llava, internvl, qwen2vl"):
        idmr.get_config("tiny,backbone=llava2")
    assert oacir.get_config("tiny,fixed_beta=0.3").model.fixed_beta == pytest.approx(0.3)
