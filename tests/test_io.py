"""io.py: the simulated drive (--io-sim) and the reader pool."""

import pytest

from chronos_mlx.errors import ChronosError
from chronos_mlx.io import parse_io_sim


def test_io_sim_reads_keys_or_bare_values_by_their_unit():
    full = parse_io_sim("bandwidth=5GB/s,latency=80us")
    assert (full.bandwidth, full.latency) == pytest.approx((5e9, 80e-6))
    bare = parse_io_sim("5GB/s")
    assert (bare.bandwidth, bare.latency) == pytest.approx((5e9, 80e-6))  # latency: the default
    both = parse_io_sim("2.5GB/s, 1ms")
    assert (both.bandwidth, both.latency) == pytest.approx((2.5e9, 1e-3))
    assert parse_io_sim(None) is None and parse_io_sim("none") is None


@pytest.mark.parametrize("spec", ["fast", "bandwidth=quick", "speed=5GB/s", "bandwidth=0GB/s", "latency=soon"])
def test_a_spec_it_cannot_read_is_a_clear_error(spec):
    with pytest.raises(ChronosError, match="--io-sim"):
        parse_io_sim(spec)


def test_reads_submitted_together_share_the_bandwidth_and_overlap_their_latency():
    ssd = parse_io_sim("bandwidth=1MB/s,latency=10ms")
    done = ssd.schedule([1_000_000 // 4, 1_000_000 // 4], started=100.0)
    assert done == pytest.approx([100.25 + 0.01, 100.5 + 0.01])
    later = ssd.schedule([0], started=100.1)  # queued behind them on the one timeline
    assert later == pytest.approx([100.5 + 0.01])
