"""Progress written to a file is a few whole lines, not one line of carriage returns."""
import io

from ssmooth import progress


def test_a_bar_written_to_a_file_prints_whole_lines_at_most_every_interval(monkeypatch):
    stream = io.StringIO()  # not a terminal, like a SLURM log
    bar = progress.progress_bar(total=1000, desc="certify", unit="pt", file=stream)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    # 1000 updates within one interval: the opening and the closing line only
    assert len(lines) == 2 and lines[0].startswith("certify:   0%") and "1000/1000" in lines[1]


def test_a_terminal_gets_the_live_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = progress.progress_bar(total=3, file=stream, mininterval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in stream.getvalue()  # redrawn in place
