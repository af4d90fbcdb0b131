"""Contract checks for components of your own, to call from your tests.

Each ``check_*`` function runs one interface's contract on an instance: the
shapes and dtypes it promises, that batch rows do not influence each other,
that its fast paths equal its plain ones, that it refuses bad input with a
``ValueError``, and that gradients reach every parameter. A property that does
not hold raises ``AssertionError`` naming the component and the property; the
component's weights, gradients and mode and the global random state are left
as they were. The checks need neither pytest nor Hypothesis, and work inside
either::

    from nextstep.testing import check_image_head

    def test_my_head():
        check_image_head(MyHead(MyHeadConfig(token_dim=16, condition_dim=32)))

The library's own components pass every check (``tests/test_contracts.py``).
"""

from nextstep.testing.backbone import check_backbone
from nextstep.testing.guidance import check_guidance
from nextstep.testing.image_head import check_image_head
from nextstep.testing.image_tokenizer import check_image_tokenizer
from nextstep.testing.parameters import assert_every_parameter_gets_a_gradient, randomize
from nextstep.testing.sampler import check_sampler
from nextstep.testing.text_tokenizer import check_text_tokenizer

__all__ = [
    "assert_every_parameter_gets_a_gradient",
    "check_backbone",
    "check_guidance",
    "check_image_head",
    "check_image_tokenizer",
    "check_sampler",
    "check_text_tokenizer",
    "randomize",
]
