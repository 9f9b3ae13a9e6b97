import io

from sdxl_core.app.progress import ProgressBar


def test_bar_counts_to_total_and_ends_its_line_once():
    stream = io.StringIO()
    bar = ProgressBar(total=3, stream=stream)
    for _ in range(5):  # e.g. ddim_uniform runs a few more steps than asked for
        bar.advance("base")
    text = stream.getvalue()
    assert text.count("\n") == 1 and "3/3" in text and "4/3" not in text


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_speed_counts_sampling_only_and_loading_is_its_own_phase():
    """A minute of loading followed by steps of half a second each shows 2 it/s from the first step on."""
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(total=2, stream=stream, clock=clock)
    with bar.loading("base tiny.safetensors"):
        clock.now += 60.0
    assert stream.getvalue() == "loading base tiny.safetensors ... 60.0 s\n"
    clock.now += 0.5
    bar.advance("base")
    assert stream.getvalue().endswith("1/2 2.00 it/s ETA 0:00:00")
    clock.now += 0.5
    bar.advance("refiner")
    assert stream.getvalue().endswith("2/2 2.00 it/s\n")


def test_slow_steps_are_shown_as_seconds_per_step():
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(total=4, stream=stream, clock=clock)
    clock.now += 8.0
    bar.advance()
    assert stream.getvalue().endswith("1/4 8.00 s/it ETA 0:00:24")


def test_a_failed_load_ends_its_line():
    stream = io.StringIO()
    bar = ProgressBar(total=1, stream=stream)
    try:
        with bar.loading("base"):
            raise ValueError("bad file")
    except ValueError:
        pass
    assert stream.getvalue() == "loading base ...\n"
