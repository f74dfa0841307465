"""to_condensed / to_dense: the dense <-> (values, idx) layout conversions."""

import pytest
import torch
import torch.nn.functional as F

import condensed_ops
from condensed_ops import to_condensed, to_dense
from conftest import INDEX_DTYPES, VALUE_DTYPES, assert_matches_reference


def constant_fan_in_mask(out_features, in_features, fan_in, generator):
    scores = torch.rand(out_features, in_features, generator=generator)
    columns = scores.argsort(dim=1)[:, :fan_in]
    return torch.zeros(out_features, in_features, dtype=torch.bool).scatter_(1, columns, True)


def check_round_trip(dense, mask, values, idx):
    out_features, in_features = dense.shape
    fan_in = int(mask[0].sum()) if out_features else 0
    assert values.shape == idx.shape == (out_features, fan_in)
    assert values.dtype == dense.dtype
    assert values.is_contiguous() and idx.is_contiguous()
    # Each row names exactly its kept columns, in ascending order.
    for row in range(out_features):
        assert idx[row].tolist() == mask[row].nonzero().flatten().tolist()
    assert torch.equal(values, dense.gather(1, idx.long()))
    assert torch.equal(to_dense(values, idx, in_features), torch.where(mask, dense, torch.zeros((), dtype=dense.dtype)))


@pytest.mark.parametrize(
    "out_features,in_features,fan_in",
    [(1, 1, 1), (5, 7, 3), (8, 33, 1), (6, 24, 24), (16, 100, 17), (3, 32767, 4), (0, 9, 0), (4, 9, 0)],
)
def test_round_trip_with_a_mask(out_features, in_features, fan_in):
    g = torch.Generator().manual_seed(out_features * 1000 + in_features)
    dense = torch.randn(out_features, in_features, generator=g)
    mask = constant_fan_in_mask(out_features, in_features, fan_in, g)
    values, idx = to_condensed(dense, mask)
    assert idx.dtype == torch.int16
    check_round_trip(dense, mask, values, idx)


@pytest.mark.parametrize("in_features,expected", [(32767, torch.int16), (32768, torch.int32), (40000, torch.int32)])
def test_default_index_dtype_follows_in_features(in_features, expected):
    g = torch.Generator().manual_seed(in_features)
    dense = torch.randn(2, in_features, generator=g)
    columns = torch.cat([torch.randperm(in_features - 1, generator=g)[:4], torch.tensor([in_features - 1])])
    mask = torch.zeros(2, in_features, dtype=torch.bool)
    mask[:, columns] = True  # includes the last column, which must come back intact
    values, idx = to_condensed(dense, mask)
    assert idx.dtype == expected
    assert int(idx[0, -1]) == in_features - 1
    check_round_trip(dense, mask, values, idx)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_explicit_index_dtype(index_dtype):
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(6, 50, generator=g)
    mask = constant_fan_in_mask(6, 50, 9, g)
    values, idx = to_condensed(dense, mask, index_dtype=index_dtype)
    assert idx.dtype == index_dtype
    check_round_trip(dense, mask, values, idx)


@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
def test_values_keep_the_weight_dtype(dtype):
    g = torch.Generator().manual_seed(4)
    dense = torch.randn(5, 12, generator=g).to(dtype)
    mask = constant_fan_in_mask(5, 12, 4, g)
    values, idx = to_condensed(dense, mask)
    check_round_trip(dense, mask, values, idx)


def test_without_a_mask_the_nonzeros_are_kept():
    g = torch.Generator().manual_seed(5)
    mask = constant_fan_in_mask(7, 20, 6, g)
    dense = torch.randn(7, 20, generator=g) * mask
    values, idx = to_condensed(dense)
    check_round_trip(dense, mask, values, idx)
    assert (values != 0).all()


def test_a_mask_keeps_explicit_zeros():
    dense = torch.tensor([[0.0, 2.0, 3.0], [4.0, 0.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    values, idx = to_condensed(dense, mask)
    assert idx.tolist() == [[0, 1], [1, 2]]
    assert values.tolist() == [[0.0, 2.0], [0.0, 6.0]]


def test_a_numeric_mask_counts_its_nonzeros():
    g = torch.Generator().manual_seed(6)
    dense = torch.randn(4, 10, generator=g)
    mask = constant_fan_in_mask(4, 10, 3, g)
    by_bool = to_condensed(dense, mask)
    by_float = to_condensed(dense, mask.float() * 0.5)
    assert all(torch.equal(a, b) for a, b in zip(by_bool, by_float))


def test_non_contiguous_weight():
    g = torch.Generator().manual_seed(7)
    mask = constant_fan_in_mask(9, 8, 3, g)
    dense = torch.randn(8, 9, generator=g).t()  # [9, 8], column-major
    values, idx = to_condensed(dense, mask)
    check_round_trip(dense, mask, values, idx)


def test_condensed_layer_computes_the_masked_dense_layer():
    g = torch.Generator().manual_seed(8)
    mask = constant_fan_in_mask(30, 45, 7, g)
    dense = torch.randn(30, 45, generator=g)
    bias = torch.randn(30, generator=g)
    x = torch.randn(11, 45, generator=g)
    values, idx = to_condensed(dense, mask)
    y = condensed_ops.condensed_linear(x, values, idx, bias)
    assert_matches_reference(y, x, values, idx, bias)
    torch.testing.assert_close(y, F.linear(x, dense * mask, bias), rtol=1e-4, atol=1e-5)


# ---- to_dense --------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_to_dense_sums_repeated_indices(index_dtype):
    values = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    idx = torch.tensor([[0, 0, 3], [2, 2, 2]], dtype=index_dtype)
    assert to_dense(values, idx, 4).tolist() == [[3.0, 0.0, 0.0, 4.0], [0.0, 0.0, 56.0, 0.0]]


def test_to_dense_matches_an_explicit_loop():
    g = torch.Generator().manual_seed(9)
    values = torch.randn(6, 15, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 10, (6, 15), generator=g)
    expected = torch.zeros(6, 10, dtype=torch.float64)
    for o in range(6):
        for j in range(15):
            expected[o, idx[o, j]] += values[o, j]
    torch.testing.assert_close(to_dense(values, idx, 10), expected)


@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
def test_to_dense_keeps_the_values_dtype(dtype):
    values = torch.randn(3, 2).to(dtype)
    idx = torch.tensor([[0, 4], [1, 2], [3, 3]], dtype=torch.int16)
    dense = to_dense(values, idx, 5)
    assert dense.dtype == dtype and dense.shape == (3, 5)


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4), ()], ids=["1d", "3d", "scalar"])
def test_to_condensed_refuses_a_weight_that_is_not_2d(shape):
    with pytest.raises(ValueError, match="dense_weight must be 2-D"):
        to_condensed(torch.ones(shape))


def test_to_condensed_refuses_a_mask_of_another_shape():
    with pytest.raises(ValueError, match=r"mask must have dense_weight's shape \[3, 4\]"):
        to_condensed(torch.ones(3, 4), torch.ones(4, 3, dtype=torch.bool))


@pytest.mark.parametrize("use_mask", [True, False], ids=["mask", "nonzeros"])
def test_to_condensed_refuses_unequal_rows(use_mask):
    mask = torch.tensor([[True, True, False], [True, False, False], [False, True, True]])
    dense = torch.randn(3, 3) * mask + mask * 0.01  # nonzero exactly where mask is set
    with pytest.raises(ValueError, match=r"same number of weights.*between 1 and 2"):
        to_condensed(dense, mask if use_mask else None)


@pytest.mark.parametrize("index_dtype", [torch.float32, torch.uint8, torch.bool, torch.int8], ids=str)
def test_to_condensed_refuses_an_unsupported_index_dtype(index_dtype):
    with pytest.raises(TypeError, match="index_dtype"):
        to_condensed(torch.eye(4), index_dtype=index_dtype)


def test_to_condensed_refuses_an_index_dtype_too_small_for_in_features():
    dense = torch.zeros(1, 40000)
    dense[0, 39999] = 1.0
    with pytest.raises(ValueError, match=r"cannot hold column 39999"):
        to_condensed(dense, index_dtype=torch.int16)


@pytest.mark.parametrize(
    "values_shape,idx_shape",
    [((3, 2), (3, 3)), ((3, 2), (2, 2)), ((6,), (6,)), ((1, 3, 2), (1, 3, 2))],
    ids=["fan_in_mismatch", "rows_mismatch", "1d", "3d"],
)
def test_to_dense_refuses_bad_shapes(values_shape, idx_shape):
    with pytest.raises(ValueError, match="values and idx must both be"):
        to_dense(torch.ones(values_shape), torch.zeros(idx_shape, dtype=torch.int32), 4)


@pytest.mark.parametrize("idx_dtype", [torch.float32, torch.bool], ids=str)
def test_to_dense_refuses_non_integer_idx(idx_dtype):
    with pytest.raises(TypeError, match="idx must be an integer tensor"):
        to_dense(torch.ones(2, 2), torch.zeros(2, 2, dtype=idx_dtype), 4)


@pytest.mark.parametrize("bad", [-1, 4, 100])
def test_to_dense_refuses_indices_outside_in_features(bad):
    idx = torch.tensor([[0, 1], [2, bad]], dtype=torch.int32)
    with pytest.raises(IndexError, match=rf"idx\[1, 1\] = {bad} is outside \[0, in_features=4\)"):
        to_dense(torch.ones(2, 2), idx, 4)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64], ids=str)
def test_index_storage_round_trips_without_copying(dtype):
    from condensed_ops.layout import index_storage, index_view

    idx = torch.randint(0, 30000, (7, 5)).to(dtype)
    storage = index_storage(idx)
    # int16 travels as bytes (distributed backends cannot broadcast int16); others as they are.
    assert storage.dtype == (torch.uint8 if dtype == torch.int16 else dtype) and storage.dim() == (1 if dtype == torch.int16 else 2)
    view = index_view(storage, [7, 5])
    assert view.dtype == dtype and torch.equal(view, idx)
    assert view.data_ptr() == storage.data_ptr()  # a view: writes through one show in the other
    view[3, 2] = 11
    assert int(index_view(storage, [7, 5])[3, 2]) == 11


@pytest.mark.parametrize(
    "bad_entries,expected",
    [({}, None), ({(0, 0): -1}, (0, 0)), ({(2, 4): 9}, (2, 4)), ({(3, 1): 50, (1, 3): -2}, (1, 3))],
)
def test_first_bad_index_is_the_first_in_row_major_order(bad_entries, expected):
    from condensed_ops.layout import first_bad_index

    idx = torch.randint(0, 9, (4, 5))
    for position, value in bad_entries.items():
        idx[position] = value
    assert first_bad_index(idx, 9) == expected
    assert first_bad_index(idx[:0], 9) is None
