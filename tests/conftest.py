"""Fixtures that several test modules share. Plain helpers and constants are in tests/helpers.py,
which the test modules import themselves."""

import pytest

# The helpers assert too (assert_same_weights, the dataset builders): let pytest explain their failures.
pytest.register_assert_rewrite("tests.helpers")

from tests.helpers import toy_segmentation  # noqa: E402  (after the rewrite is registered)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """toy_segmentation's data, prepared: the path of the prepared root, as a string."""
    return str(toy_segmentation(tmp_path_factory.mktemp("toy")))
