from __future__ import annotations

import torch

from protorkd.eval.features import FeatureCache, text_features, weights_fingerprint


def test_text_features_come_back_in_input_order_whatever_the_batching(tiny_model):
    texts = ["a much longer caption with many words", "short", "a medium caption", "x"]
    one_by_one = torch.cat([text_features(tiny_model, [t], device="cpu") for t in texts])
    batched = text_features(tiny_model, texts, device="cpu", batch_size=3)
    assert torch.allclose(batched, one_by_one, atol=1e-6)


def test_fingerprint_changes_with_any_weight_and_not_otherwise():
    layer = torch.nn.Linear(3, 2)
    before = weights_fingerprint(layer)
    assert weights_fingerprint(layer) == before
    with torch.no_grad():
        layer.bias[0] += 1e-6
    assert weights_fingerprint(layer) != before


def test_memory_cache_keeps_at_most_its_byte_budget_dropping_the_least_recently_used():
    cache = FeatureCache(memory_bytes=2 * 400)  # two entries of 100 float32
    calls = []

    def make(i):
        return lambda: calls.append(i) or {"x": torch.full((100,), float(i))}

    for i in (0, 1):
        cache.get_or_compute({"i": i}, make(i))
    cache.get_or_compute({"i": 0}, make(0))  # 0 is now the most recently used
    cache.get_or_compute({"i": 2}, make(2))  # evicts 1
    cache.get_or_compute({"i": 0}, make(0))
    cache.get_or_compute({"i": 1}, make(1))
    assert calls == [0, 1, 2, 1]


def test_disk_cache_survives_a_new_cache_object_and_a_damaged_entry_is_recomputed(tmp_path):
    FeatureCache(tmp_path).get_or_compute({"k": 1}, lambda: {"x": torch.ones(3)})
    fresh = FeatureCache(tmp_path)
    assert torch.equal(fresh.get_or_compute({"k": 1}, lambda: {"x": torch.zeros(3)})["x"], torch.ones(3))
    next(tmp_path.glob("*.pt")).write_bytes(b"garbage")
    value = FeatureCache(tmp_path).get_or_compute({"k": 1}, lambda: {"x": torch.zeros(3)})
    assert torch.equal(value["x"], torch.zeros(3))
