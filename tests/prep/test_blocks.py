"""Parsing one block of raw input into documents (prep/blocks.py), as the shard job's workers do."""

from prep.blocks import _plain_block_documents
from prep.formats import format_events, group_documents
from prep.ranges import inspect_input, plan_runs, read_run
from prep.textio import ReadStats


def test_whole_blocks_of_wikitext_take_the_one_pass_reader(wiki_valid):
    """Blocks within the limits are read in one pass over their lines instead of line by line through generators
    (the shard job's workers spend a third less CPU reading); that reader must give the documents the general one
    gives, and it must really serve real WikiText-2 rather than fall back every time."""
    range_bytes = 1 << 18
    blocks = [block for run in plan_runs([inspect_input(wiki_valid)], range_bytes, 1)
              for _, block in read_run(run, range_bytes)]
    assert len(blocks) > 3
    for block in blocks:
        text = block.data.decode("utf-8-sig" if block.at_start else "utf-8")
        fast = _plain_block_documents(text, True, 20_000, 200_000)
        events = format_events("wikitext", [text], ReadStats(), 20_000, 1_200_000, wiki_valid, block.first_line)
        assert fast is not None and fast == list(group_documents(events, ReadStats(), 200_000))
    assert _plain_block_documents("a\n" + "b" * 101 + "\n", False, 100, 1000) is None  # a long line
    assert _plain_block_documents("a b\nc d\n\ne f\n", False, 100, 5) is None  # a long document
