"""The benchmarks' shared report helpers."""

from deepimage.bench.report import ratio


def test_a_ratio_is_of_the_medians_and_its_spread_is_per_repeat():
    rates = {"ours": [300.0, 200.0, 400.0], "peer": [100.0, 100.0, 50.0]}
    value, text = ratio(rates, "ours", "peer")
    assert value == 3.0  # median 300 over median 100, not the mean of the per-repeat ratios
    assert text == "3.00x (per repeat 2.00-8.00x)"
