"""experiments/host_overhead.py's simulated device on a few requests: the real engine's host
work around a device clock, synchronous and asynchronous."""
import pathlib

from experiments import host_overhead


def test_a_simulated_device_step_takes_its_time_and_the_host_comes_on_top(tmp_path):
    model = str(host_overhead.tiny_model_dir(pathlib.Path(tmp_path)))
    step_ms = 30.0  # far above the host work of 8 requests
    steps = 8
    sync = host_overhead.measure(model, 8, False, step_ms, steps=steps)
    async_ = host_overhead.measure(model, 8, True, step_ms, steps=steps)
    # Every step waits for its device step. (Asynchronously the first timed step finds its
    # device step already under way, dispatched by the call before: the steps' device work
    # in the timed window is at least steps - 1 whole device steps.)
    assert sync["wall_ms_per_step"] >= step_ms
    assert async_["wall_ms_per_step"] * steps >= step_ms * (steps - 1)
    for r in (sync, async_):
        assert r["exposed_host_ms"] == r["wall_ms_per_step"] - step_ms
        assert 0 <= r["device_idle_fraction"] < 1
        assert r["host_ms_per_step"] > 0
    # Synchronous host work sits between device steps: all of it is exposed. (How much
    # asynchronous steps hide is the experiment's figure, not a test's.)
    assert sync["exposed_host_ms"] >= sync["host_ms_per_step"] * 0.9
    assert sync["async_scheduling"] is False and async_["async_scheduling"] is True
