"""data/order: a training order that depends on (seed, epoch) only, and resuming inside an epoch."""

from __future__ import annotations

import torch

from deltatune.data.order import ResumableLoader, ShuffledRows


def test_order_is_a_function_of_seed_and_epoch():
    a, b = ShuffledRows(50, 4, seed=3), ShuffledRows(50, 4, seed=3)
    assert a.order(2) == b.order(2)
    assert sorted(a.order(2)) == list(range(50))
    assert a.order(0) != a.order(1)
    assert ShuffledRows(50, 4, seed=4).order(2) != a.order(2)
    b.set_epoch(2)
    assert list(b) == a.order(2)


def test_resume_skips_the_batches_already_served_once():
    order = ShuffledRows(10, 3, seed=1)
    order.resume(epoch=1, batches=2)
    assert list(order) == order.order(1)[6:]
    assert list(order) == order.order(1)  # the skip applies to one iteration only


def test_loader_state_round_trip_continues_with_the_next_batch():
    rows = torch.arange(20)
    first = ResumableLoader(rows, sampler=ShuffledRows(20, 4, seed=7), batch_size=4)
    first.order.set_epoch(1)
    served = []
    for i, batch in enumerate(first):
        served.append(batch.tolist())
        if i == 1:
            state = first.state_dict()
            break
    assert state == {"epoch": 1, "batches": 2}
    resumed = ResumableLoader(rows, sampler=ShuffledRows(20, 4, seed=7), batch_size=4)
    resumed.load_state_dict(state)
    rest = [batch.tolist() for batch in resumed]
    whole = [b for b in ShuffledRows(20, 4, seed=7).batches(1)]
    assert served + rest == whole


def test_an_epoch_served_whole_resumes_at_the_next_epoch():
    loader = ResumableLoader(torch.arange(8), sampler=ShuffledRows(8, 4, seed=0), batch_size=4)
    list(loader)
    assert loader.state_dict() == {"epoch": 1, "batches": 0}
