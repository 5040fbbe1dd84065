"""The engine's KV side against a context that only keeps positions, as llama.cpp's memory API reports them:
where a request goes, what of its prompt it keeps, compaction, prefix sharing, and running out of room.
No model: these are the decisions, not the decoding."""
import pytest

from backends.engine.kv import MIN_SHARED, KvCache
from backends.engine.work import Job, Ticket


class Cells:
    """Positions each sequence holds, edited as llama.cpp would edit its cells."""

    def __init__(self, n_ctx: int = 4096, parallel: int = 4, unified: bool = False):
        self.n_ctx, self.kv_unified = n_ctx, unified
        self.n_ctx_seq = n_ctx if unified else n_ctx // parallel
        self.held: dict[int, set[int]] = {}
        self.shares: list[tuple[int, int, int]] = []

    def positions(self, seq):
        held = self.held.get(seq)
        return (min(held), max(held)) if held else (-1, -1)

    def forget(self, seq, start=0):
        self.held[seq] = {p for p in self.held.get(seq, set()) if p < start}

    def share(self, src, dst, keep):
        self.shares.append((src, dst, keep))
        self.held[dst] = {p for p in self.held.get(src, set()) if p < keep}

    def clear(self):
        self.held = {}

    def evaluate(self, kv: KvCache, slot, tokens, prompt=True):
        """What a decode of these tokens does: cells in llama.cpp, then the KV side records them."""
        start = len(slot.cached)
        self.held.setdefault(slot.seq, set()).update(range(start, start + len(tokens)))
        kv.hold(slot, tokens, prompt)


arrivals = iter(range(10**6))


def job(prompt):
    return Job(list(prompt), sampler=None, matcher=None, max_tokens=100)


def ticket():
    return Ticket((0.0, next(arrivals)), hard=1e9, prepare=None, floor_s=0.0, floor_full_s=0.0)


def serve_prompt(cells, kv, prompt):
    """Place a job and evaluate its whole prompt; the slot it got."""
    j = job(prompt)
    slot = kv.place(j, ticket())
    cells.evaluate(kv, slot, j.prompt[j.done_prompt:])
    return slot


PROMPT = list(range(1000, 1300))


def test_with_streams_a_newcomer_takes_the_lowest_free_sequence():
    cells = Cells()
    kv = KvCache(cells, 4)
    assert [serve_prompt(cells, kv, PROMPT).seq for _ in range(3)] == [0, 1, 2]
    kv.release(kv.slots[1])
    assert kv.place(job(PROMPT), ticket()).seq == 1


def test_a_prompt_keeps_the_cells_its_slot_holds_of_it_but_always_evaluates_its_last_token():
    cells = Cells()
    kv = KvCache(cells, 4)
    slot = serve_prompt(cells, kv, PROMPT)
    kv.release(slot)
    again = job(PROMPT)
    assert kv.place(again, ticket()) is slot
    assert again.done_prompt == again.reused == len(PROMPT) - 1
    assert cells.positions(slot.seq) == (0, len(PROMPT) - 2)  # the last token's cell dropped: it is evaluated
    kv.release(slot)
    other = job(PROMPT[:100] + [7] * 50)
    kv.place(other, ticket())
    assert other.reused == 100 and cells.positions(slot.seq) == (0, 99)


def test_cells_that_are_not_what_the_slot_says_are_not_reused():
    cells = Cells()
    kv = KvCache(cells, 4)
    slot = serve_prompt(cells, kv, PROMPT)
    kv.release(slot)
    cells.held[slot.seq] = set(range(50, len(PROMPT)))  # the start of the sequence is gone (as after a shift)
    again = job(PROMPT)
    kv.place(again, ticket())
    assert again.reused == 0 and cells.positions(slot.seq) == (-1, -1)


def test_in_a_unified_cache_a_newcomer_takes_the_slot_holding_most_of_its_prompt_else_the_least_used():
    cells = Cells(unified=True)
    kv = KvCache(cells, 4)
    assert kv.room == 4096 // 4  # each request keeps to its share of the pool
    a = serve_prompt(cells, kv, PROMPT)
    b = serve_prompt(cells, kv, [5] * 300)
    kv.release(b)
    kv.release(a)
    assert kv.place(job([5] * 200 + [6]), ticket()) is b
    fresh = kv.place(job([9] * 10), ticket())
    assert fresh.seq in (2, 3) and fresh is not a  # a holds a prompt someone may ask again; 2 and 3 hold nothing


def test_compaction_keeps_busy_sequences_consecutive():
    cells = Cells()
    kv = KvCache(cells, 4)
    slots = [serve_prompt(cells, kv, [s] * 100) for s in range(3)]
    moving = slots[2].job
    kv.release(slots[0])
    kv.compact()
    assert slots[0].job is moving and slots[2].job is None  # the highest busy sequence moved to the free 0
    assert cells.shares == [(2, 0, 100)] and cells.positions(0) == (0, 99) and kv.copied
    assert slots[0].cached == [2] * 100 and slots[2].cached == [2] * 100  # the old stream stays as a prefix
    kv.copied = False
    kv.compact()
    assert not kv.copied  # 0 and 1 busy: nothing to move


def test_a_burst_waits_for_its_leader_then_copies_the_prompt_it_evaluated():
    cells = Cells()
    kv = KvCache(cells, 4)
    leader, follower = job(PROMPT), job(PROMPT)
    lead = kv.place(leader, ticket())
    follow = kv.place(follower, ticket())
    cells.evaluate(kv, lead, PROMPT[:64])
    assert kv.leader_ahead(follow) and not kv.leader_ahead(lead)
    cells.evaluate(kv, lead, PROMPT[64:])
    assert not kv.leader_ahead(follow)
    kv.borrow(follow)
    assert follower.done_prompt == follower.reused == len(PROMPT) - 1
    assert cells.shares == [(lead.seq, follow.seq, len(PROMPT) - 1)] and kv.copied


def test_a_short_shared_start_is_evaluated_rather_than_copied():
    cells = Cells()
    kv = KvCache(cells, 4)
    serve_prompt(cells, kv, PROMPT)
    short = job(PROMPT[:MIN_SHARED - 1] + [1] * 100)
    slot = kv.place(short, ticket())
    kv.borrow(slot)
    assert short.reused == 0 and not cells.shares


def test_sharing_turned_off_neither_waits_nor_copies():
    cells = Cells()
    kv = KvCache(cells, 4, share_prefixes=False)
    lead = kv.place(job(PROMPT), ticket())
    follow = kv.place(job(PROMPT), ticket())
    cells.evaluate(kv, lead, PROMPT[:10])
    assert not kv.leader_ahead(follow)
    cells.evaluate(kv, lead, PROMPT[10:])
    kv.borrow(follow)
    assert follow.job.reused == 0 and not cells.shares


def test_out_of_room_the_cached_prompts_of_free_slots_go_first():
    cells = Cells(unified=True)
    kv = KvCache(cells, 4)
    busy = serve_prompt(cells, kv, PROMPT)
    idle = serve_prompt(cells, kv, [3] * 200)
    kv.release(idle)
    assert kv.drop_idle()
    assert idle.cached == [] and cells.positions(idle.seq) == (-1, -1)
    assert busy.cached == PROMPT and cells.positions(busy.seq) == (0, len(PROMPT) - 1)
    assert not kv.drop_idle()  # nothing left to drop: the caller refuses the answer as busy


def test_a_failed_decode_leaves_each_sequence_with_what_it_is_known_to_hold():
    cells = Cells()
    kv = KvCache(cells, 4)
    slot = serve_prompt(cells, kv, PROMPT)
    cells.held[slot.seq].update(range(len(PROMPT), len(PROMPT) + 5))  # a decode wrote cells, then failed
    kv.restore([slot])
    assert cells.positions(slot.seq) == (0, len(PROMPT) - 1)


def test_a_placement_that_fails_leaves_the_slot_free():
    cells = Cells()
    kv = KvCache(cells, 4)

    def broken(seq, start=0):
        raise RuntimeError("injected")

    cells.forget = broken
    with pytest.raises(RuntimeError):
        kv.place(job(PROMPT), ticket())
    assert len(kv.free()) == 4

