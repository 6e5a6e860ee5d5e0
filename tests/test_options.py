"""RegularizerOptions: validated once, frozen, and the one options object of the trainers and the hook."""

import dataclasses
import math

import pytest

from kl_nontarget import RegularizerOptions
from kl_nontarget.training.options import options_from


def test_defaults_and_normalisation():
    options = RegularizerOptions(kl_weight=2, temperature=1)
    assert (options.kl_weight, options.temperature, options.kl_direction, options.fused_linear) == \
        (2.0, 1.0, "forward", "auto")
    assert type(options.kl_weight) is float and type(options.temperature) is float
    assert not options.reverse and RegularizerOptions(kl_direction="reverse").reverse
    assert options.loss_kwargs() == {"kl_weight": 2.0, "temperature": 1.0, "kl_direction": "forward"}


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(kl_weight=-1.0), ValueError, "kl_weight must be a finite number >= 0"),
    (dict(kl_weight=math.inf), ValueError, "kl_weight must be a finite number >= 0"),
    (dict(kl_weight="1"), TypeError, "kl_weight must be a number, got str"),
    (dict(kl_weight=True), TypeError, "kl_weight must be a number, got bool"),
    (dict(temperature=0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=None), TypeError, "temperature must be a number, got NoneType"),
    (dict(kl_direction="both"), ValueError, "kl_direction must be one of"),
    (dict(fused_linear="yes"), ValueError, "fused_linear must be True, False or 'auto'"),
    (dict(fused_linear=1), ValueError, "fused_linear must be True, False or 'auto'"),
])
def test_bad_values_name_the_option(kwargs, error, message):
    with pytest.raises(error, match=message):
        RegularizerOptions(**kwargs)


def test_frozen_and_replace_revalidates():
    options = RegularizerOptions(kl_weight=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.kl_weight = 1.0
    assert options.replace(temperature=2.0) == RegularizerOptions(kl_weight=0.5, temperature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        options.replace(temperature=-1.0)


def test_from_object_reads_matching_attributes():
    class Config:  # stands for a config dataclass with more fields than the regularizer's
        kl_weight = 0.3
        kl_direction = "reverse"
        learning_rate = 1e-4

    assert RegularizerOptions.from_object(Config()) == RegularizerOptions(kl_weight=0.3, kl_direction="reverse")
    assert RegularizerOptions.from_object(Config(), kl_weight=2.0).kl_weight == 2.0
    Config.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        RegularizerOptions.from_object(Config())


def test_holders_read_and_assign_through_the_options():
    from kl_nontarget.training.options import UsesRegularizerOptions

    holder = UsesRegularizerOptions()
    holder.kl_weight = 0.7  # no options yet: the defaults, with this change
    assert holder.options == RegularizerOptions(kl_weight=0.7)
    first = holder.options
    holder.kl_direction = "reverse"
    assert holder.options == RegularizerOptions(kl_weight=0.7, kl_direction="reverse")
    assert first.kl_direction == "forward"  # frozen: the earlier object is unchanged
    with pytest.raises(ValueError, match="temperature"):
        holder.temperature = 0.0
    assert holder.temperature == 1.0


def test_options_or_keywords_not_both():
    options = RegularizerOptions(kl_weight=0.5)
    assert options_from(options, kl_weight=1.0, fused_linear="auto") is options  # keywords left at their defaults
    assert options_from(None, kl_weight=3) == RegularizerOptions(kl_weight=3.0)
    with pytest.raises(ValueError, match="either options= or kl_weight, temperature"):
        options_from(options, kl_weight=2.0, temperature=0.5)
    with pytest.raises(TypeError, match="RegularizerOptions"):
        options_from({"kl_weight": 1.0})
