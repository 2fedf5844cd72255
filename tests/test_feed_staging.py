"""``runtime/feed_staging.FeedStaging``: a paged call's integer feeds in one copy (CPU tier: the
same code with an unpinned host buffer and a CPU "device")."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ember.runtime.feed_staging import ALIGN, FeedStaging, layout  # noqa: E402


def test_put_returns_typed_views_of_one_buffer_and_grows():
    s = FeedStaging(torch, "cpu", nbytes=64)
    feeds = {"input_ids": np.arange(5, dtype=np.int64), "cu": np.array([0, 2, 5], np.int32),
             "table": np.arange(12, dtype=np.int32).reshape(3, 4) - 1}
    views = s.put(feeds)
    assert s.nbytes >= 4096  # a floor, so small calls never regrow it
    for name, a in feeds.items():
        assert views[name].shape == a.shape and views[name].numpy().dtype == a.dtype
        np.testing.assert_array_equal(views[name].numpy(), a)
        assert views[name].data_ptr() % ALIGN == 0
        assert s.dev.data_ptr() <= views[name].data_ptr() < s.dev.data_ptr() + s.nbytes  # one buffer
    big = {"input_ids": np.arange(3000, dtype=np.int64)}
    np.testing.assert_array_equal(s.put(big)["input_ids"].numpy(), big["input_ids"])
    assert s.nbytes >= 3000 * 8


def test_put_fixed_keeps_the_views_a_graph_captured():
    offsets, total = layout({"ids": 4 * 8, "past": 4 * 4})
    s = FeedStaging(torch, "cpu", total)
    ids, past = s.view(offsets["ids"], np.int64, (4,)), s.view(offsets["past"], np.int32, (2, 2))
    for k in range(3):
        s.put_fixed({"ids": np.full(4, k, np.int64), "past": np.full((2, 2), 10 + k, np.int32)}, offsets)
        assert ids.tolist() == [k] * 4 and past.flatten().tolist() == [10 + k] * 4
    s.put_fixed({"ids": np.array([7, 8], np.int64)}, offsets)  # a smaller bucket: a prefix of its region
    assert ids.tolist() == [7, 8, 2, 2]
