"""WordVectorInput: ids are checked against its rows before any table is read."""

import pytest
import torch

from nextstep.layers.word_vectors import WordVectorConfig, WordVectorInput


@pytest.mark.parametrize("ids", [[[0, 5]], [[5]], [[-1, 2]]])
def test_an_id_just_outside_the_rows_is_named_with_the_range(ids):
    module = WordVectorInput(WordVectorConfig(count=5, dim=2), table_size=3, hidden_size=4)
    with pytest.raises(ValueError, match=r"text ids must lie in \[0, 5\), found"):
        module(torch.tensor(ids))
    table, added = module(torch.tensor([[0, 4]]))
    assert table.tolist() == [[0, 2]] and added.shape == (1, 2, 4)
