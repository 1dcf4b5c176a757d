"""Messages name many things the same way: the first few, then how many more."""

from __future__ import annotations

from pathlib import Path

from wsi_ssl.listing import first_few
from wsi_ssl.outcome import BatchOutcome, JobInterrupted
from wsi_ssl.tiling.slide_table import SlideTable


def test_first_few_shows_at_most_the_limit_and_counts_the_rest() -> None:
    assert first_few([]) == ""
    assert first_few(["a", "b"]) == "a, b"
    assert first_few(range(5)) == "0, 1, 2, 3, 4"
    assert first_few(range(12)) == "0, 1, 2, 3, 4 and 7 more"
    assert first_few((f"s{i}" for i in range(4)), limit=3) == "s0, s1, s2 and 1 more"


def test_a_batch_table_names_its_unmatched_rows_and_how_many_more() -> None:
    table = SlideTable("mpp.csv", {f"slide{i}": 0.5 for i in range(8)})
    note = table.unmatched_note([Path("/data/slide0.svs")])
    assert note is not None
    assert note.startswith("7 row(s) of mpp.csv name no slide of this batch ")
    assert "(slide1, slide2, slide3, slide4, slide5 and 2 more)" in note


def test_an_interrupted_job_names_the_slides_not_done_and_how_many_more() -> None:
    interrupted = JobInterrupted(BatchOutcome(), [f"s{i}.svs" for i in range(7)])
    assert interrupted.lines()[-1] == (
        "not done: 7 slide(s) when interrupted (s0.svs, s1.svs, s2.svs, s3.svs, s4.svs and 2 more)"
    )
