import io

from sdxl_core.app.progress import ProgressBar


def test_bar_counts_to_total_and_ends_its_line_once():
    stream = io.StringIO()
    bar = ProgressBar(total=3, stream=stream)
    for _ in range(5):  # e.g. ddim_uniform runs a few more steps than asked for
        bar.advance("base")
    text = stream.getvalue()
    assert text.count("\n") == 1 and "3/3" in text and "4/3" not in text
