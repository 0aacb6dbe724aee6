"""experiments/schedule_cost.py on tiny settings: every timed step decodes every request."""
from experiments import schedule_cost


def test_decode_schedules_are_timed_with_and_without_prefix_caching():
    for caching in (True, False):
        ms = schedule_cost.decode_schedule_ms(8, 40, 16, 5, caching)
        assert 0 < ms < 1e3
    text = schedule_cost.report(dict(num_requests=8, prompt_len=40, block_size=16, steps=5,
                                     prefix_caching=0.1, no_prefix_caching=0.05))
    assert "prefix_caching" in text and "0.10 ms" in text
